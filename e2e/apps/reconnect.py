"""A client that reuses its socket for a second connection, as connect(2) allows. It reads
everything a streaming server sent (256 KiB), disconnects with connect(AF_UNSPEC) (its RST to the
old server is dropped by the test, so the old server does not learn of it), lets the old server go
on sending, then connects the same socket to a second server and reads that server's answer to
EOF. Prints one JSON line: what the second connection received.

Usage: reconnect.py BIND_PORT STREAM_PORT ANSWER_PORT (all on 127.0.0.1; both servers run here).
"""
import ctypes
import json
import socket
import sys
import threading
import time

bind_port, stream_port, answer_port = (int(a) for a in sys.argv[1:4])
ANSWER = b"B" * 4096


def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4)
    return s


FIRST = 256 * 1024
resume = threading.Event()
sent_after = [0]


def streamer(ls):
    c, _ = ls.accept()
    c.sendall(b"A" * FIRST)
    resume.wait()
    try:
        while True:
            c.sendall(b"A" * 4096)
            sent_after[0] += 4096
    except OSError:
        pass


def answerer(ls):
    c, _ = ls.accept()
    c.sendall(ANSWER)
    c.close()


ls1, ls2 = listener(stream_port), listener(answer_port)
threading.Thread(target=streamer, args=(ls1,), daemon=True).start()
threading.Thread(target=answerer, args=(ls2,), daemon=True).start()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", bind_port))
s.connect(("127.0.0.1", stream_port))
got = 0
while got < FIRST:
    got += len(s.recv(FIRST - got))
# connect(AF_UNSPEC): the kernel's way to dissolve a connection and keep the socket.
unspec = (ctypes.c_char * 16)()
libc = ctypes.CDLL(None, use_errno=True)
if libc.connect(s.fileno(), unspec, 16) != 0:
    print(json.dumps({"ok": False, "error": "connect(AF_UNSPEC): errno %d" % ctypes.get_errno()}))
    sys.exit(1)
# The old server goes on sending (it never learned of the disconnect).
resume.set()
deadline = time.monotonic() + 5
while sent_after[0] < 64 * 1024 and time.monotonic() < deadline:
    time.sleep(0.01)
s.connect(("127.0.0.1", answer_port))
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
print(json.dumps({
    "ok": data == ANSWER,
    "bytes": len(data),
    "foreign_bytes": len(data) - data.count(b"B"),
    "old_server_sent_after": sent_after[0],
    "first_foreign_at": next((i for i, c in enumerate(data) if c != ord("B")), None),
}))
