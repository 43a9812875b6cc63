// Java conformance app (OpenJDK 17, blocking java.net.Socket / ServerSocket, no SO_TIMEOUT).
//
// Usage (classes built by e2e/conformance/build-apps.sh into OUTDIR/java):
//   java -cp OUTDIR/java Conform server MODE --port P --conns N [--seed S] [--deadline S]
//                                      [--jvm-default-stack]
//   java -cp OUTDIR/java Conform client MODE --target IP:PORT --conns N [--seed S] [--deadline S]
//                                      [--jvm-default-stack]
//
// Contract: the server listens on 0.0.0.0:P, prints the line `ready` once it listens, handles
// exactly N connections concurrently, then prints one JSON line and exits 0 (all correct) or 1.
// The client makes N concurrent connections, prints one JSON line, exits 0/1. The JSON line is the
// last line on stdout; logs go to stderr:
//   {"ok":true,"mode":"...","side":"client"|"server","bytes_in":I,"bytes_out":O,
//    "outcome":"...","errors":[...]}
// `outcome` is the same whatever the transport does underneath (no timings, no run-varying
// counts): the success outcome of the mode, or the sorted failure categories joined by '+'.
//
// --deadline S (default 20, 0: none): a watchdog that, if the run is still going after S seconds,
// records the error "stalled" (with how far the run got) and ends it with the JSON line and exit 1,
// so that a hang still reports. It is no timeout on any socket operation.
//
// Data: byte i of a stream is (i*31 + 7 + seed) % 251. Client-to-server streams use seed S,
// server-to-client streams seed S+1 (default S = 0), so a stream reflected back is detected.
// Every received byte is verified. An IOException from a blocking call is an error reported with
// its message: nothing is retried, and nothing sleeps (but the watchdog).
//
// Modes:
//   java-threads   per connection one reader thread and one writer thread at once, both sides.
//                  The writer sends 2 MiB through the socket's OutputStream in writes of varied
//                  sizes; the reader reads the peer's 2 MiB with InputStream.read(byte[16384]).
//                  The client closes once both threads are done; the server then reads EOF
//                  (no extra byte) and closes. Success outcome "verified".
//   java-halfclose client writes 10 KiB, shutdownOutput(), reads until -1 (expects 100 KiB);
//                  server reads until -1 (expects 10 KiB), writes 100 KiB, closes.
//                  Success outcome "eof".
// Failure categories: mismatch, short, extra, io-error, connect, interrupted, stalled.
//
// Sockets: a JVM started without -Djava.net.preferIPv4Stack=true opens AF_INET6 sockets even for
// IPv4 (binding 0.0.0.0 then listens dual-stack on [::], and IPv4 peers are IPv4-mapped
// ::ffff:a.b.c.d addresses). The contract asks for IPv4, so main() sets java.net.preferIPv4Stack
// before any networking class is initialized: every socket is AF_INET. The flag --jvm-default-stack
// keeps the JVM's default (AF_INET6, v4-mapped) to exercise that variant.

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.PrintStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.TreeSet;
import java.util.concurrent.atomic.AtomicLong;

public final class Conform {
    static final int THREADS_BYTES = 2 * 1024 * 1024;
    static final int HALF_C2S = 10 * 1024;
    static final int HALF_S2C = 100 * 1024;
    static final int MAX_ERRORS = 20;
    /** Write sizes, used in turn by the writers. */
    static final int[] WRITE_SIZES = {
        1, 7, 100, 1448, 4096, 3, 16384, 65536, 1000, 8191, 2, 131072, 16385, 512, 262144, 1460,
    };

    final String side;
    final String mode;
    final int conns;
    final int seed;
    final AtomicLong bytesIn = new AtomicLong();
    final AtomicLong bytesOut = new AtomicLong();
    /** Connections done, for the watchdog's message. */
    final AtomicLong finished = new AtomicLong();
    final List<String> errors = new ArrayList<>();
    final TreeSet<String> categories = new TreeSet<>();

    Conform(String side, String mode, int conns, int seed) {
        this.side = side;
        this.mode = mode;
        this.conns = conns;
        this.seed = seed;
    }

    static int patternByte(long i, int seed) {
        return (int) ((i * 31 + 7 + seed) % 251);
    }

    static void fill(byte[] buf, int len, long offset, int seed) {
        for (int k = 0; k < len; k++) {
            buf[k] = (byte) patternByte(offset + k, seed);
        }
    }

    int seedC2S() {
        return seed;
    }

    int seedS2C() {
        return seed + 1;
    }

    synchronized void fail(String category, String message) {
        categories.add(category);
        if (errors.size() < MAX_ERRORS) {
            errors.add(message);
        }
        System.err.println("[conform-java " + side + " " + mode + "] error: " + message);
    }

    static void log(String msg) {
        System.err.println("[conform-java] " + msg);
    }

    /** An IOException's message, as stable as the JDK makes it. */
    static String describe(Throwable e) {
        String m = e.getMessage();
        return e.getClass().getSimpleName() + (m == null ? "" : ": " + m);
    }

    // ---- stream helpers ------------------------------------------------------------------------

    /** Writes `total` pattern bytes in writes of varied sizes; returns false after an error. */
    boolean writePattern(String who, OutputStream out, long total, int seed) {
        byte[] buf = new byte[262144];
        long off = 0;
        int turn = 0;
        try {
            while (off < total) {
                int n = (int) Math.min(WRITE_SIZES[turn++ % WRITE_SIZES.length], total - off);
                fill(buf, n, off, seed);
                out.write(buf, 0, n);
                off += n;
                bytesOut.addAndGet(n);
            }
            out.flush();
            return true;
        } catch (IOException e) {
            fail("io-error", who + " write at byte " + off + ": " + describe(e));
            return false;
        }
    }

    /**
     * Reads and verifies the peer's pattern. With untilEof, reads until -1 and checks the length is
     * exactly `expected`; otherwise stops after `expected` bytes (a short stream, EOF before it, is
     * an error). Returns the byte count read, or -1 after an error.
     */
    long readPattern(String who, InputStream in, long expected, int seed, boolean untilEof) {
        byte[] buf = new byte[16384];
        long off = 0;
        try {
            while (untilEof || off < expected) {
                int n = in.read(buf);
                if (n < 0) {
                    break;
                }
                bytesIn.addAndGet(n);
                for (int k = 0; k < n; k++) {
                    long pos = off + k;
                    if (pos >= expected) {
                        fail("extra", who + ": more than " + expected + " bytes received");
                        return -1;
                    }
                    int want = patternByte(pos, seed);
                    if ((buf[k] & 0xff) != want) {
                        fail("mismatch", who + ": byte " + pos + " is " + (buf[k] & 0xff)
                                + ", expected " + want);
                        return -1;
                    }
                }
                off += n;
            }
        } catch (IOException e) {
            fail("io-error", who + " read at byte " + off + ": " + describe(e));
            return -1;
        }
        if (off != expected) {
            fail("short", who + ": EOF after " + off + " of " + expected + " bytes");
            return -1;
        }
        return off;
    }

    void closeQuietly(String who, Socket s) {
        try {
            s.close();
        } catch (IOException e) {
            fail("io-error", who + " close: " + describe(e));
        }
    }

    // ---- modes ---------------------------------------------------------------------------------

    /** One connection of java-threads: a reader thread and a writer thread at once. */
    void threadsConn(Socket s, int idx, boolean server) throws InterruptedException {
        String who = side + " conn " + idx;
        InputStream in;
        OutputStream out;
        try {
            in = s.getInputStream();
            out = s.getOutputStream();
        } catch (IOException e) {
            fail("io-error", who + " streams: " + describe(e));
            closeQuietly(who, s);
            return;
        }
        int inSeed = server ? seedC2S() : seedS2C();
        int outSeed = server ? seedS2C() : seedC2S();
        Thread writer = new Thread(() -> writePattern(who + " writer", out, THREADS_BYTES, outSeed),
                "writer-" + idx);
        // The client stops after the peer's 2 MiB; the server reads on to EOF (the client closes
        // once done), which shows no byte beyond the 2 MiB arrived.
        Thread reader = new Thread(() -> readPattern(who + " reader", in, THREADS_BYTES, inSeed,
                server), "reader-" + idx);
        writer.start();
        reader.start();
        writer.join();
        reader.join();
        closeQuietly(who, s);
    }

    /** One connection of java-halfclose. */
    void halfCloseConn(Socket s, int idx, boolean server) {
        String who = side + " conn " + idx;
        try {
            InputStream in = s.getInputStream();
            OutputStream out = s.getOutputStream();
            if (server) {
                if (readPattern(who, in, HALF_C2S, seedC2S(), true) >= 0) {
                    writePattern(who, out, HALF_S2C, seedS2C());
                }
            } else {
                if (writePattern(who, out, HALF_C2S, seedC2S())) {
                    s.shutdownOutput();
                    readPattern(who, in, HALF_S2C, seedS2C(), true);
                }
            }
        } catch (IOException e) {
            fail("io-error", who + ": " + describe(e));
        }
        closeQuietly(who, s);
    }

    void handle(Socket s, int idx) throws InterruptedException {
        boolean server = side.equals("server");
        if (mode.equals("java-threads")) {
            threadsConn(s, idx, server);
        } else {
            halfCloseConn(s, idx, server);
        }
        finished.incrementAndGet();
    }

    String successOutcome() {
        return mode.equals("java-halfclose") ? "eof" : "verified";
    }

    // ---- sides ---------------------------------------------------------------------------------

    /** handle(s, idx) on a connection thread; an interrupt is that connection's failure. */
    void handleConn(Socket s, int idx) {
        try {
            handle(s, idx);
        } catch (InterruptedException e) {
            fail("interrupted", "conn " + idx + ": interrupted");
        }
    }

    /** Starts connection i's thread ("conn-i") running body and adds it to handlers. */
    static void startConn(List<Thread> handlers, int i, Runnable body) {
        Thread t = new Thread(body, "conn-" + i);
        t.start();
        handlers.add(t);
    }

    void runServer(int port) throws Exception {
        ServerSocket ss = new ServerSocket();
        ss.setReuseAddress(true);
        ss.bind(new InetSocketAddress(InetAddress.getByName("0.0.0.0"), port), Math.max(128, conns));
        System.out.println("ready");
        System.out.flush();
        List<Thread> handlers = new ArrayList<>();
        for (int i = 0; i < conns; i++) {
            Socket s;
            try {
                s = ss.accept();
            } catch (IOException e) {
                fail("io-error", "accept: " + describe(e));
                break;
            }
            final int idx = i;
            startConn(handlers, i, () -> handleConn(s, idx));
        }
        ss.close();
        for (Thread t : handlers) {
            t.join();
        }
    }

    void runClient(String host, int port) throws Exception {
        List<Thread> handlers = new ArrayList<>();
        for (int i = 0; i < conns; i++) {
            final int idx = i;
            startConn(handlers, i, () -> {
                Socket s;
                try {
                    s = new Socket(host, port);
                } catch (IOException e) {
                    fail("connect", "conn " + idx + " connect: " + describe(e));
                    return;
                }
                handleConn(s, idx);
            });
        }
        for (Thread t : handlers) {
            t.join();
        }
    }

    // ---- output --------------------------------------------------------------------------------

    static String jsonString(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
            }
        }
        return b.append('"').toString();
    }

    synchronized String json() {
        boolean ok = errors.isEmpty() && categories.isEmpty();
        String outcome = ok ? successOutcome() : String.join("+", categories);
        StringBuilder b = new StringBuilder();
        b.append("{\"ok\": ").append(ok)
            .append(", \"mode\": ").append(jsonString(mode))
            .append(", \"side\": ").append(jsonString(side))
            .append(", \"bytes_in\": ").append(bytesIn.get())
            .append(", \"bytes_out\": ").append(bytesOut.get())
            .append(", \"outcome\": ").append(jsonString(outcome))
            .append(", \"errors\": [");
        for (int i = 0; i < errors.size(); i++) {
            if (i > 0) {
                b.append(", ");
            }
            b.append(jsonString(errors.get(i)));
        }
        return b.append("]}").toString();
    }

    static final Object EXIT_LOCK = new Object();

    /** Prints the JSON line and exits; a second caller (main or watchdog) waits for the exit. */
    void exit() {
        synchronized (EXIT_LOCK) {
            String line = json();
            PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
            out.println(line);
            out.flush();
            System.exit(line.startsWith("{\"ok\": true") ? 0 : 1);
        }
    }

    /** A hang (the kind of bug the suite hunts) still ends with a JSON line, "stalled". */
    void startWatchdog(double seconds) {
        Thread w = new Thread(() -> {
            try {
                Thread.sleep((long) (seconds * 1000));
            } catch (InterruptedException e) {
                return;
            }
            fail("stalled", "watchdog: not finished after " + seconds + " s (" + finished.get()
                    + " of " + conns + " connections done, bytes_in " + bytesIn.get()
                    + ", bytes_out " + bytesOut.get() + ")");
            exit();
        }, "watchdog");
        w.setDaemon(true);
        w.start();
    }

    static void usage(String why) {
        System.err.println("conform-java: " + why);
        System.err.println("usage: java Conform server MODE --port P --conns N [--seed S]"
                + " [--deadline S] [--jvm-default-stack]");
        System.err.println("       java Conform client MODE --target IP:PORT --conns N [--seed S]"
                + " [--deadline S] [--jvm-default-stack]");
        System.err.println("modes: java-threads, java-halfclose");
        System.exit(2);
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            usage("missing SIDE and MODE");
        }
        String side = args[0];
        String mode = args[1];
        if (!side.equals("server") && !side.equals("client")) {
            usage("unknown side " + side);
        }
        if (!mode.equals("java-threads") && !mode.equals("java-halfclose")) {
            usage("unknown mode " + mode);
        }
        int port = -1;
        int conns = 1;
        int seed = 0;
        String target = null;
        boolean jvmDefaultStack = false;
        double deadline = 20;
        for (int i = 2; i < args.length; i++) {
            String a = args[i];
            if (a.equals("--jvm-default-stack")) {
                jvmDefaultStack = true;
                continue;
            }
            if (i + 1 >= args.length) {
                usage("flag " + a + " needs a value");
            }
            String v = args[++i];
            switch (a) {
                case "--port": port = Integer.parseInt(v); break;
                case "--conns": conns = Integer.parseInt(v); break;
                case "--seed": seed = Integer.parseInt(v); break;
                case "--target": target = v; break;
                case "--deadline": deadline = Double.parseDouble(v); break;
                default: usage("unknown flag " + a);
            }
        }
        if (conns < 1) {
            usage("--conns must be >= 1");
        }
        // Before the first use of java.net: read once, when the networking classes initialize.
        if (!jvmDefaultStack) {
            System.setProperty("java.net.preferIPv4Stack", "true");
        }
        // Seeds stay in 0..249 so seed+1 differs from seed modulo 251.
        seed = Math.floorMod(seed, 250);
        Conform c = new Conform(side, mode, conns, seed);
        if (deadline > 0) {
            c.startWatchdog(deadline);
        }
        if (side.equals("server")) {
            if (port < 0 || port > 65535) {
                usage("server needs --port P");
            }
            c.runServer(port);
        } else {
            if (target == null || target.lastIndexOf(':') <= 0) {
                usage("client needs --target IP:PORT");
            }
            int colon = target.lastIndexOf(':');
            String host = target.substring(0, colon);
            if (host.startsWith("[") && host.endsWith("]")) {
                host = host.substring(1, host.length() - 1);
            }
            c.runClient(host, Integer.parseInt(target.substring(colon + 1)));
        }
        c.exit();
    }
}
