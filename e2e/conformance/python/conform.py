#!/usr/bin/python3
"""The CPython app of meshaccel's application conformance suite (stdlib only).

    conform.py server MODE --port P --conns N [--deadline S]
    conform.py client MODE --target IP:PORT --conns N [--deadline S]

Modes (see ../README.md):
  py-threads                a reader thread and a writer thread on one blocking socket
  py-halfclose              request, shutdown(SHUT_WR), response until EOF
  py-asyncio                asyncio streams, 1000 keep-alive request/response exchanges
  py-timeout-then-blocking  create_connection(timeout=5), settimeout(None), then as py-threads

The server prints `ready` once it listens; both sides end with one JSON line on stdout
  {"ok": .., "mode": .., "side": .., "bytes_in": .., "bytes_out": .., "outcome": .., "errors": [..]}
and exit 0 (everything as expected) or 1. Diagnostics go to stderr.

Blocking sockets use the socket default (no timeout): a BlockingIOError (EAGAIN) or any other
OSError there is an error, never retried. Every received byte is checked against the pattern
shared with conform.c.
"""

import argparse
import asyncio
import errno
import fcntl
import json
import os
import random
import socket
import sys
import threading
import time

KiB = 1024
MiB = 1024 * KiB

SEED_C2S = 1  # the client's bytes to the server
SEED_S2C = 2  # the server's bytes to the client

# Byte i of the stream with seed s is T[(i + 7919*s) mod 65521],
# T[k] = ((31*k + 7) mod 251) XOR (floor(k / 251) mod 256); the same as conform.c.
PAT_LEN = 65521
_T = bytes((((31 * k + 7) % 251) ^ ((k // 251) & 0xFF)) for k in range(PAT_LEN))
_T3 = _T * 3


def pattern(seed, off, n):
    parts = []
    while n > 0:
        k = (off + 7919 * seed) % PAT_LEN
        m = min(n, 2 * PAT_LEN)
        parts.append(_T3[k:k + m])
        off += m
        n -= m
    return b"".join(parts)


def ename(e):
    if e is None:
        return "no errno"
    return errno.errorcode.get(e, "E%d" % e)


# ---------------------------------------------------------------------------------------------
# Report


class Report:
    def __init__(self):
        self.lock = threading.Lock()
        self.errors = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.printed = False
        self.main_stage = "starting"
        self.conns = []

    def add_in(self, n):
        with self.lock:
            self.bytes_in += n

    def add_out(self, n):
        with self.lock:
            self.bytes_out += n


R = Report()
ARGS = None


class Conn:
    def __init__(self, cid):
        self.id = cid
        self.stage = "not started"
        self.off = 0
        self.nerr = 0
        self.fail = None
        self.outcome = None
        self.finished = False
        self.aborting = False

    def at(self, stage, off=0):
        self.stage = stage
        self.off = off

    def error(self, cls, msg):
        full = "%s [conn %d]" % (msg, self.id)
        print("conform.py %s %s: error: %s" % (ARGS.side, ARGS.mode, full), file=sys.stderr,
              flush=True)
        with R.lock:
            R.errors.append(full)
            if self.fail is None:
                self.fail = cls
            self.nerr += 1

    def oserror(self, call, exc, what, off=None):
        """`recv: EAGAIN (Resource temporarily unavailable) while WHAT at offset OFF`."""
        if off is None:
            off = self.off
        e = getattr(exc, "errno", None)
        if e is None:
            name, desc = type(exc).__name__, str(exc) or type(exc).__name__
        else:
            name, desc = ename(e), os.strerror(e)
        self.error("%s-%s" % (call, name),
                   "%s: %s (%s) while %s at offset %d" % (call, name, desc, what, off))


def global_error(msg):
    print("conform.py %s %s: error: %s" % (ARGS.side, ARGS.mode, msg), file=sys.stderr,
          flush=True)
    with R.lock:
        R.errors.append(msg)


class Stream:
    def __init__(self, seed, name):
        self.seed = seed
        self.name = name
        self.off = 0

    def take(self, n):
        data = pattern(self.seed, self.off, n)
        self.off += n
        return data

    def check(self, conn, data):
        exp = pattern(self.seed, self.off, len(data))
        if data != exp:
            i = next(j for j in range(len(data)) if data[j] != exp[j])
            conn.error("mismatch", "data: %s mismatch at offset %d: got 0x%02x, expected 0x%02x"
                       % (self.name, self.off + i, data[i], exp[i]))
            self.off += len(data)
            return False
        self.off += len(data)
        return True


def finish(stalled=False):
    """Prints the final JSON line and exits (called once: by main or by the watchdog)."""
    with R.lock:
        if R.printed:
            return
        R.printed = True
        outs = []
        all_expected = True
        for c in R.conns:
            if c.nerr:
                outs.append("fail:" + (c.fail or "error"))
                all_expected = False
            elif not c.finished or c.outcome is None:
                outs.append("stalled" if stalled else "incomplete")
                all_expected = False
            else:
                outs.append(c.outcome)
                if c.outcome != EXPECT[ARGS.mode]:
                    all_expected = False
        outcome = "+".join(sorted(set(outs))) or ("stalled" if stalled else "none")
        ok = not R.errors and all_expected and not stalled
        line = json.dumps({
            "ok": ok,
            "mode": ARGS.mode,
            "side": ARGS.side,
            "bytes_in": R.bytes_in,
            "bytes_out": R.bytes_out,
            "outcome": outcome,
            "errors": list(R.errors),
        })
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)


def watchdog():
    time.sleep(ARGS.deadline)
    where = ["main: " + R.main_stage]
    for c in R.conns:
        if not c.finished:
            where.append("conn %d: %s at offset %d" % (c.id, c.stage, c.off))
    global_error("watchdog: not finished after %g s (%s)" % (ARGS.deadline, "; ".join(where)))
    finish(stalled=True)


# ---------------------------------------------------------------------------------------------
# Blocking-socket helpers


def recv_stream_eof(conn, sock, stream, total, bufsz, what):
    """recv(bufsz) until b''; checks every byte and that exactly `total` came."""
    start = stream.off
    while True:
        conn.at(what, stream.off)
        try:
            data = sock.recv(bufsz)
        except OSError as e:
            if not conn.aborting:
                conn.oserror("recv", e, what, stream.off)
            return False
        if not data:
            break
        R.add_in(len(data))
        if not stream.check(conn, data):
            return False
        if stream.off - start > total:
            conn.error("extra-data", "recv: %d bytes while %s, more than the %d the peer sends"
                       % (stream.off - start, what, total))
            return False
    if stream.off - start != total:
        conn.error("premature-eof", "recv: EOF after %d of %d bytes while %s"
                   % (stream.off - start, total, what))
        return False
    return True


def send_stream(conn, sock, stream, total, lo, hi, rng, what):
    """sendall() `total` bytes of the stream in chunks of lo..hi bytes."""
    sent = 0
    while sent < total:
        n = min(rng.randint(lo, hi), total - sent)
        conn.at(what, stream.off)
        data = stream.take(n)
        try:
            sock.sendall(data)
        except OSError as e:
            if not conn.aborting:
                conn.oserror("sendall", e, what, stream.off - n)
            return False
        R.add_out(n)
        sent += n
    return True


def shutdown_wr(conn, sock, what, off):
    try:
        sock.shutdown(socket.SHUT_WR)
        return True
    except OSError as e:
        if not conn.aborting:
            conn.oserror("shutdown(SHUT_WR)", e, what, off)
        return False


# ---------------------------------------------------------------------------------------------
# py-threads / py-timeout-then-blocking: reader thread + writer thread on one blocking socket

THREADS_BYTES = 2 * MiB


def duplex(conn, sock, out_seed, in_seed):
    def writer():
        s = Stream(out_seed, "outgoing stream")
        rng = random.Random(out_seed * 1000003 + conn.id)
        if send_stream(conn, sock, s, THREADS_BYTES, 1, 64 * KiB, rng,
                       "writer thread sending 2 MiB"):
            shutdown_wr(conn, sock, "ending the outgoing stream", s.off)

    wt = threading.Thread(target=writer, daemon=True)
    wt.start()
    ok = recv_stream_eof(conn, sock, Stream(in_seed, "peer's stream"), THREADS_BYTES, 16384,
                         "reader thread reading 2 MiB")
    if not ok:
        conn.aborting = True  # unblock our writer, which may wait for a peer that stopped
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    wt.join()
    conn.outcome = "ok"


def threads_server(conn, sock):
    duplex(conn, sock, SEED_S2C, SEED_C2S)


def threads_client(conn, sock):
    duplex(conn, sock, SEED_C2S, SEED_S2C)


def tmo_client_connect(conn):
    """The common pattern: connect with a timeout, then switch to blocking I/O."""
    host, port = ARGS.target
    conn.at("create_connection(timeout=5)")
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as e:
        conn.oserror("connect", e, "create_connection(timeout=5) to the target", 0)
        return None
    sock.settimeout(None)
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    if sock.gettimeout() is not None or flags & os.O_NONBLOCK:
        conn.error("still-nonblocking", "settimeout(None): gettimeout() %r, O_NONBLOCK %s"
                   % (sock.gettimeout(), bool(flags & os.O_NONBLOCK)))
        sock.close()
        return None
    return sock


# ---------------------------------------------------------------------------------------------
# py-halfclose

HC_REQ = 10 * KiB
HC_RESP = 100 * KiB


def halfclose_server(conn, sock):
    if not recv_stream_eof(conn, sock, Stream(SEED_C2S, "request"), HC_REQ, 16384,
                           "reading the request until EOF"):
        return
    if not send_stream(conn, sock, Stream(SEED_S2C, "response"), HC_RESP, 1, 16 * KiB,
                       random.Random(5), "sending the response"):
        return
    conn.outcome = "eof"


def halfclose_client(conn, sock):
    out = Stream(SEED_C2S, "request")
    if not send_stream(conn, sock, out, HC_REQ, 1, 4 * KiB, random.Random(6 + conn.id),
                       "sending the request"):
        return
    if not shutdown_wr(conn, sock, "half-closing after the request", out.off):
        return
    if not recv_stream_eof(conn, sock, Stream(SEED_S2C, "response"), HC_RESP, 16384,
                           "reading the response until EOF"):
        return
    conn.outcome = "eof"


# ---------------------------------------------------------------------------------------------
# Threaded server / client frameworks (blocking sockets)


def serve_thread(conn, sock, handler):
    try:
        handler(conn, sock)
    except Exception as e:  # a bug in this program: report it, do not hang
        conn.error("exception", "exception: %r while %s" % (e, conn.stage))
    finally:
        sock.close()
        conn.finished = True


def run_threaded_server(handler):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        ls.bind(("0.0.0.0", ARGS.port))
        ls.listen(128)
    except OSError as e:
        global_error("bind/listen: %s (%s) on 0.0.0.0:%d" % (ename(e.errno),
                                                             os.strerror(e.errno), ARGS.port))
        return
    print("ready", flush=True)
    threads = []
    for k in range(ARGS.conns):
        R.main_stage = "accepting connections"
        try:
            sock, _ = ls.accept()
        except OSError as e:
            global_error("accept: %s (%s)" % (ename(e.errno), os.strerror(e.errno)))
            break
        t = threading.Thread(target=serve_thread, args=(R.conns[k], sock, handler), daemon=True)
        t.start()
        threads.append(t)
    ls.close()
    R.main_stage = "waiting for connection threads"
    for t in threads:
        t.join()


def client_thread(conn, handler, connect):
    try:
        if connect is not None:
            sock = connect(conn)
        else:
            conn.at("connecting")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.connect(ARGS.target)
            except OSError as e:
                conn.oserror("connect", e, "connecting to the target", 0)
                sock.close()
                sock = None
        if sock is not None:
            try:
                handler(conn, sock)
            finally:
                sock.close()
    except Exception as e:
        conn.error("exception", "exception: %r while %s" % (e, conn.stage))
    finally:
        conn.finished = True


def run_threaded_client(handler, concurrent, connect=None):
    if not concurrent:
        R.main_stage = "running connections one after the other"
        for c in R.conns:
            client_thread(c, handler, connect)
        return
    R.main_stage = "waiting for concurrent connections"
    threads = [threading.Thread(target=client_thread, args=(c, handler, connect), daemon=True)
               for c in R.conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------------------------------------
# py-asyncio: keep-alive request/response over asyncio streams

AS_REQ = 1 * KiB
AS_RESP = 4 * KiB
AS_STALL = 5.0  # seconds without progress on one read = "stalled"


def as_failed(conn, e, call, stalled_msg, what, off):
    """Records a failed read/drain: asyncio.TimeoutError (tested first: in 3.11 it is an OSError)
    is `stalled` with stalled_msg, any other OSError is call's error while what at off."""
    if isinstance(e, asyncio.TimeoutError):
        conn.error("stalled", stalled_msg)
    else:
        conn.oserror(call, e, what, off)


async def as_read(conn, reader, n, what, off):
    """readexactly(n) with a stall timeout; returns bytes, b'' at a clean EOF, None on error."""
    conn.at(what, off)
    try:
        data = await asyncio.wait_for(reader.readexactly(n), AS_STALL)
    except asyncio.IncompleteReadError as e:
        R.add_in(len(e.partial))
        if not e.partial:
            return b""
        conn.error("premature-eof", "read: EOF after %d of %d bytes while %s at offset %d"
                   % (len(e.partial), n, what, off))
        return None
    except (asyncio.TimeoutError, OSError) as e:
        as_failed(conn, e, "read", "read: stalled: no %d bytes within %g s while %s at offset %d"
                  % (n, AS_STALL, what, off), what, off)
        return None
    R.add_in(len(data))
    return data


async def as_write(conn, writer, data, what, off):
    conn.at(what, off)
    try:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), AS_STALL)
    except (asyncio.TimeoutError, OSError) as e:
        as_failed(conn, e, "write", "write: stalled: drain() did not finish within %g s while %s"
                  % (AS_STALL, what), what, off)
        return False
    R.add_out(len(data))
    return True


async def as_close(conn, writer):
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), AS_STALL)
    except (OSError, asyncio.TimeoutError) as e:
        conn.oserror("close", e, "closing the connection")


async def asyncio_server_main():
    done = asyncio.Event()
    state = {"next": 0, "finished": 0}

    async def handle(reader, writer):
        if state["next"] >= ARGS.conns:
            writer.close()
            return
        conn = R.conns[state["next"]]
        state["next"] += 1
        cin, cout = Stream(SEED_C2S, "requests"), Stream(SEED_S2C, "responses")
        try:
            count = 0
            while True:
                req = await as_read(conn, reader, AS_REQ, "reading a 1 KiB request", cin.off)
                if req is None:
                    break
                if req == b"":
                    if count == ARGS.exchanges:
                        conn.outcome = "ok"
                    else:
                        conn.error("premature-eof", "read: EOF after %d of %d exchanges"
                                   % (count, ARGS.exchanges))
                    break
                if not cin.check(conn, req):
                    break
                count += 1
                if count > ARGS.exchanges:
                    conn.error("extra-data", "read: more than %d requests" % ARGS.exchanges)
                    break
                if not await as_write(conn, writer, cout.take(AS_RESP),
                                      "writing a 4 KiB response", cout.off):
                    break
            await as_close(conn, writer)
        except Exception as e:
            conn.error("exception", "exception: %r while %s" % (e, conn.stage))
        finally:
            conn.finished = True
            state["finished"] += 1
            if state["finished"] == ARGS.conns:
                done.set()

    try:
        server = await asyncio.start_server(handle, "0.0.0.0", ARGS.port, reuse_address=True,
                                            backlog=128)
    except OSError as e:
        global_error("bind/listen: %s (%s) on 0.0.0.0:%d" % (ename(e.errno),
                                                             os.strerror(e.errno), ARGS.port))
        return
    print("ready", flush=True)
    R.main_stage = "serving connections"
    await done.wait()
    server.close()
    await server.wait_closed()


async def asyncio_client_one(conn):
    host, port = ARGS.target
    conn.at("connecting")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), AS_STALL)
    except (OSError, asyncio.TimeoutError) as e:
        conn.oserror("connect", e, "connecting to the target", 0)
        return
    cin, cout = Stream(SEED_S2C, "responses"), Stream(SEED_C2S, "requests")
    for _ in range(ARGS.exchanges):
        if not await as_write(conn, writer, cout.take(AS_REQ), "writing a 1 KiB request",
                              cout.off):
            break
        resp = await as_read(conn, reader, AS_RESP, "reading a 4 KiB response", cin.off)
        if resp is None:
            break
        if resp == b"":
            conn.error("premature-eof", "read: EOF instead of a response at offset %d" % cin.off)
            break
        if not cin.check(conn, resp):
            break
    else:
        try:
            writer.write_eof()
        except OSError as e:
            conn.oserror("shutdown(SHUT_WR)", e, "ending the requests", cout.off)
        else:
            rest = await as_read(conn, reader, 1, "waiting for the server's EOF", cin.off)
            if rest is not None and rest != b"":
                conn.error("extra-data", "read: data instead of EOF after the last response")
            elif rest == b"":
                conn.outcome = "ok"
    await as_close(conn, writer)


async def asyncio_client_main():
    R.main_stage = "waiting for concurrent connections"

    async def one(conn):
        try:
            await asyncio_client_one(conn)
        except Exception as e:
            conn.error("exception", "exception: %r while %s" % (e, conn.stage))
        finally:
            conn.finished = True

    await asyncio.gather(*(one(c) for c in R.conns))


# ---------------------------------------------------------------------------------------------

EXPECT = {
    "py-threads": "ok",
    "py-halfclose": "eof",
    "py-asyncio": "ok",
    "py-timeout-then-blocking": "ok",
}


def parse_target(s):
    host, sep, port = s.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected IP:PORT")
    socket.inet_aton(host)
    return host, int(port)


def main():
    global ARGS
    ap = argparse.ArgumentParser(description="meshaccel conformance app (CPython)")
    ap.add_argument("side", choices=["server", "client"])
    ap.add_argument("mode", choices=sorted(EXPECT))
    ap.add_argument("--port", type=int)
    ap.add_argument("--target", type=parse_target)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=20.0,
                    help="the watchdog reports ok:false after this many seconds (0: none)")
    ap.add_argument("--exchanges", type=int, default=1000,
                    help="py-asyncio: request/response exchanges per connection")
    ARGS = ap.parse_args()
    if ARGS.side == "server" and ARGS.port is None:
        ap.error("server needs --port")
    if ARGS.side == "client" and ARGS.target is None:
        ap.error("client needs --target")
    if ARGS.conns < 1:
        ap.error("--conns must be >= 1")
    R.conns = [Conn(i) for i in range(ARGS.conns)]
    if ARGS.deadline > 0:
        threading.Thread(target=watchdog, daemon=True).start()

    server = ARGS.side == "server"
    m = ARGS.mode
    if m == "py-asyncio":
        asyncio.run(asyncio_server_main() if server else asyncio_client_main())
    elif m in ("py-threads", "py-timeout-then-blocking"):
        if server:
            run_threaded_server(threads_server)
        else:
            run_threaded_client(threads_client, concurrent=True,
                                connect=tmo_client_connect if m == "py-timeout-then-blocking"
                                else None)
    elif m == "py-halfclose":
        if server:
            run_threaded_server(halfclose_server)
        else:
            run_threaded_client(halfclose_client, concurrent=False)
    R.main_stage = "done"
    finish()


if __name__ == "__main__":
    main()
