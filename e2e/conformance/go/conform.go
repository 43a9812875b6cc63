// Command conform-go: the Go apps of the application conformance suite (standard library only).
//
// Usage (built by e2e/conformance/build-apps.sh into OUTDIR/conform-go):
//
//	conform-go server MODE --port P --conns N [--seed S] [--requests R] [--deadline S]
//	conform-go client MODE --target IP:PORT --conns N [--seed S] [--requests R] [--deadline S]
//	                       [--path /data.bin --size BYTES]          (go-fetch)
//	conform-go proxy [go-copy-proxy] --listen IP:LP --upstream IP:PORT --conns N [--deadline S]
//
// Contract: a server listens on 0.0.0.0:P (IPv4) and the proxy on --listen; each prints the line
// `ready` once it listens. A server or proxy handles exactly N connections (go-http: until the
// client's GET /quit), a client makes N connections; then each prints one JSON line, the last line
// on stdout (logs go to stderr), and exits 0 if everything was correct, 1 otherwise:
//
//	{"ok":true,"mode":"...","side":"client"|"server"|"proxy","bytes_in":I,"bytes_out":O,
//	 "outcome":"...","errors":[...]}
//
// `outcome` does not depend on how the transport behaved underneath (no timings, no counts that
// vary from run to run): the mode's success outcome, or the sorted failure categories joined by
// '+'.
//
// --deadline S (default 20, 0: none): a watchdog that, if the run is still going after S seconds,
// records the error "stalled" (with how far the run got) and ends it with the JSON line and exit 1,
// so that a hang still reports. It is no timeout on any socket operation.
//
// Data: byte i of a stream is (i*31 + 7 + seed) % 251. Client-to-server data uses seed S,
// server-to-client data seed S+1 (default S = 0), so data reflected back is detected; go-fetch
// expects the file itself to hold seed S (data.bin: byte i = (i*31+7) % 251). Every received byte
// is verified. Errors from blocking calls are reported with their message, never retried.
//
// Modes:
//
//	go-http        server: net/http on the port; GET /data?n=K answers K bytes (seed S+1),
//	               POST /echo answers its body (verified as seed S), GET /quit ends the server.
//	               It expects N*R requests (R = --requests, default 300) besides /quit, and
//	               every request of a kind to carry the same request line, Host and headers.
//	               client: net/http (keep-alive, MaxIdleConnsPerHost >= N), N goroutines each
//	               doing R requests alternating GET /data?n=4096 and POST /echo of 1 KiB, then
//	               GET /quit. Every response of a kind must carry the same headers (Date apart,
//	               which must be valid). The Transport allows N connections at most
//	               (MaxConnsPerHost = N): dialing more than N means a keep-alive connection was
//	               lost (net/http would silently retry a GET on a new one), an error
//	               ("reconnect").
//	go-fetch       client only: N goroutines x R keep-alive GETs of --path, each body verified as
//	               --size bytes of seed S (for nginx serving data.bin). Same header and
//	               "reconnect" checks.
//	go-copy-proxy  proxy: accepts N connections, dials --upstream for each, io.Copy between the two
//	               *net.TCPConn both ways (TCPConn.ReadFrom splices on Linux), CloseWrite towards
//	               the side whose source direction ended (after a copy error too: the error is
//	               reported, the peer sees EOF), closes both when both directions ended.
//	               bytes_in = client-to-upstream bytes, bytes_out = upstream-to-client bytes.
//	echo           (alias go-copy-proxy for server/client) server: echoes everything until EOF,
//	               then closes (and expects the client's 4 MiB, verified). client: sends 4 MiB
//	               in varied writes while reading the echo, CloseWrite, verifies 4 MiB echoed
//	               then EOF.
//	go-stream      server sends 8 MiB on each connection then closes; client reads with io.Copy
//	               into a verifying io.Writer and expects exactly 8 MiB then EOF.
//
// Success outcomes: clients "verified"; servers "served" (go-http), "echoed" (echo), "sent"
// (go-stream); the proxy "relayed". Failure categories: mismatch, short, extra, io-error,
// connect, listen, http, header, count, reconnect, stalled.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	echoBytes   = 4 << 20
	streamBytes = 8 << 20
	httpGetSize = 4096
	httpPostLen = 1024
	maxErrors   = 20
	maxHTTPBody = 64 << 20
)

// Write sizes, used in turn by every writer.
var writeSizes = []int{1, 7, 100, 1448, 4096, 3, 16384, 65536, 1000, 8191, 2, 131072, 16385, 512, 262144, 1460}

// ---- pattern ---------------------------------------------------------------------------------

func patternByte(i int64, seed int) byte { return byte((i*31 + 7 + int64(seed)) % 251) }

// fill writes the pattern bytes [off, off+len(buf)) of seed into buf.
func fill(buf []byte, off int64, seed int) {
	v := (off*31 + 7 + int64(seed)) % 251
	for k := range buf {
		buf[k] = byte(v)
		v += 31
		if v >= 251 {
			v -= 251
		}
	}
}

func patternBytes(n int, seed int) []byte {
	b := make([]byte, n)
	fill(b, 0, seed)
	return b
}

// checkPattern returns the index of the first byte of buf that is not the pattern at off, or -1.
func checkPattern(buf []byte, off int64, seed int) int {
	v := (off*31 + 7 + int64(seed)) % 251
	for k, b := range buf {
		if b != byte(v) {
			return k
		}
		v += 31
		if v >= 251 {
			v -= 251
		}
	}
	return -1
}

type categorized struct {
	cat string
	msg string
}

func (e *categorized) Error() string { return e.msg }

func catErr(cat, format string, args ...any) error {
	return &categorized{cat: cat, msg: fmt.Sprintf(format, args...)}
}

// verifier is an io.Writer that checks what it is given against the pattern.
type verifier struct {
	off      int64
	seed     int
	expected int64
	counter  *atomic.Int64
}

func (v *verifier) Write(p []byte) (int, error) {
	v.counter.Add(int64(len(p)))
	valid := p
	if v.off+int64(len(p)) > v.expected {
		valid = p[:v.expected-v.off]
	}
	if k := checkPattern(valid, v.off, v.seed); k >= 0 {
		pos := v.off + int64(k)
		return 0, catErr("mismatch", "byte %d is %d, expected %d", pos, p[k], patternByte(pos, v.seed))
	}
	if len(valid) < len(p) {
		return 0, catErr("extra", "more than %d bytes received", v.expected)
	}
	v.off += int64(len(p))
	return len(p), nil
}

// ---- report ----------------------------------------------------------------------------------

type report struct {
	side, mode string
	bytesIn    atomic.Int64
	bytesOut   atomic.Int64
	finished   atomic.Int64 // connections (HTTP: workers) done, for the watchdog's message
	mu         sync.Mutex
	errs       []string
	cats       map[string]bool
	exitMu     sync.Mutex // held by the one goroutine that prints the JSON line and exits
}

func newReport(side, mode string) *report {
	return &report{side: side, mode: mode, cats: map[string]bool{}}
}

func (r *report) fail(cat, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.mu.Lock()
	r.cats[cat] = true
	if len(r.errs) < maxErrors {
		r.errs = append(r.errs, msg)
	}
	r.mu.Unlock()
	logf("%s %s error: %s", r.side, r.mode, msg)
}

// failErr records err, using its category when it has one and cat otherwise.
func (r *report) failErr(cat, who string, err error) {
	var c *categorized
	if errors.As(err, &c) {
		cat = c.cat
	}
	r.fail(cat, "%s: %v", who, err)
}

// exit prints the JSON line and exits (0 if no error was recorded, 1 otherwise). Called by main
// and by the watchdog: whichever comes second blocks until the process is gone.
func (r *report) exit(success string) {
	r.exitMu.Lock()
	os.Exit(r.finish(success))
}

// watchdog: a hang (the kind of bug the suite hunts) still ends with a JSON line, "stalled".
func (r *report) watchdog(deadline time.Duration, conns int, success string) {
	time.Sleep(deadline)
	r.fail("stalled", "watchdog: not finished after %v (%d of %d connections done, bytes_in %d, bytes_out %d)",
		deadline, r.finished.Load(), conns, r.bytesIn.Load(), r.bytesOut.Load())
	r.exit(success)
}

// finish prints the JSON line and returns the exit code.
func (r *report) finish(success string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	ok := len(r.cats) == 0
	outcome := success
	if !ok {
		var cats []string
		for c := range r.cats {
			cats = append(cats, c)
		}
		sort.Strings(cats)
		outcome = strings.Join(cats, "+")
	}
	errs := r.errs
	if errs == nil {
		errs = []string{}
	}
	line, err := json.Marshal(struct {
		OK       bool     `json:"ok"`
		Mode     string   `json:"mode"`
		Side     string   `json:"side"`
		BytesIn  int64    `json:"bytes_in"`
		BytesOut int64    `json:"bytes_out"`
		Outcome  string   `json:"outcome"`
		Errors   []string `json:"errors"`
	}{ok, r.mode, r.side, r.bytesIn.Load(), r.bytesOut.Load(), outcome, errs})
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(append(line, '\n'))
	if ok {
		return 0
	}
	return 1
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[conform-go] "+format+"\n", args...)
}

func ready() { os.Stdout.Write([]byte("ready\n")) }

// writePattern writes total pattern bytes of seed to w in writes of varied sizes.
func writePattern(w io.Writer, total int64, seed int, counter *atomic.Int64) error {
	buf := make([]byte, 262144)
	var off int64
	for turn := 0; off < total; turn++ {
		n := int64(writeSizes[turn%len(writeSizes)])
		if n > total-off {
			n = total - off
		}
		fill(buf[:n], off, seed)
		m, err := w.Write(buf[:n])
		off += int64(m)
		counter.Add(int64(m))
		if err != nil {
			return catErr("io-error", "write at byte %d: %v", off, err)
		}
	}
	return nil
}

// readPattern reads r to EOF through io.Copy into a verifier; exactly expected bytes must come.
func readPattern(r io.Reader, expected int64, seed int, counter *atomic.Int64) error {
	v := &verifier{seed: seed, expected: expected, counter: counter}
	_, err := io.Copy(v, r)
	if err != nil {
		var c *categorized
		if errors.As(err, &c) {
			return err
		}
		return catErr("io-error", "read at byte %d: %v", v.off, err)
	}
	if v.off != expected {
		return catErr("short", "EOF after %d of %d bytes", v.off, expected)
	}
	return nil
}

func listen(port int) (net.Listener, error) {
	return net.Listen("tcp4", net.JoinHostPort("0.0.0.0", strconv.Itoa(port)))
}

// acceptN accepts n connections and runs handle on each in its own goroutine, then waits.
func acceptN(ln net.Listener, n int, rep *report, handle func(idx int, c *net.TCPConn)) {
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		c, err := ln.Accept()
		if err != nil {
			rep.fail("io-error", "accept: %v", err)
			break
		}
		wg.Add(1)
		go func(idx int, c *net.TCPConn) {
			defer wg.Done()
			handle(idx, c)
			rep.finished.Add(1)
		}(i, c.(*net.TCPConn))
	}
	ln.Close()
	wg.Wait()
}

func dialN(target string, n int, rep *report, handle func(idx int, c *net.TCPConn)) {
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(idx int) {
			defer wg.Done()
			defer rep.finished.Add(1)
			c, err := net.Dial("tcp", target)
			if err != nil {
				rep.fail("connect", "conn %d connect: %v", idx, err)
				return
			}
			handle(idx, c.(*net.TCPConn))
		}(i)
	}
	wg.Wait()
}

func closeConn(rep *report, who string, c net.Conn) {
	if err := c.Close(); err != nil {
		rep.fail("io-error", "%s close: %v", who, err)
	}
}

// serveConns listens on o.port, prints ready and runs handle on each of the o.conns accepted
// connections ("conn IDX"), closing each after its handle returns.
func serveConns(o *opts, rep *report, handle func(who string, c *net.TCPConn)) {
	ln, err := listen(o.port)
	if err != nil {
		rep.fail("listen", "listen: %v", err)
		return
	}
	ready()
	acceptN(ln, o.conns, rep, func(idx int, c *net.TCPConn) {
		who := fmt.Sprintf("conn %d", idx)
		defer closeConn(rep, who, c)
		handle(who, c)
	})
}

// dialConns runs handle on each of the o.conns connections to o.target ("conn IDX"), closing
// each after its handle returns.
func dialConns(o *opts, rep *report, handle func(who string, c *net.TCPConn)) {
	dialN(o.target, o.conns, rep, func(idx int, c *net.TCPConn) {
		who := fmt.Sprintf("conn %d", idx)
		defer closeConn(rep, who, c)
		handle(who, c)
	})
}

// ---- echo ------------------------------------------------------------------------------------

func echoServer(o *opts, rep *report) {
	serveConns(o, rep, func(who string, c *net.TCPConn) {
		buf := make([]byte, 65536)
		var off int64
		for {
			n, err := c.Read(buf)
			if n > 0 {
				rep.bytesIn.Add(int64(n))
				if k := checkPattern(buf[:n], off, o.seed); k >= 0 {
					pos := off + int64(k)
					rep.fail("mismatch", "%s: byte %d is %d, expected %d", who, pos, buf[k], patternByte(pos, o.seed))
					return
				}
				off += int64(n)
				m, werr := c.Write(buf[:n])
				rep.bytesOut.Add(int64(m))
				if werr != nil {
					rep.fail("io-error", "%s write: %v", who, werr)
					return
				}
			}
			if err == io.EOF {
				// The echo client sends exactly 4 MiB.
				if off < echoBytes {
					rep.fail("short", "%s: EOF after %d of %d bytes", who, off, echoBytes)
				} else if off > echoBytes {
					rep.fail("extra", "%s: %d bytes received, expected %d", who, off, echoBytes)
				}
				return
			}
			if err != nil {
				rep.fail("io-error", "%s read at byte %d: %v", who, off, err)
				return
			}
		}
	})
}

func echoClient(o *opts, rep *report) {
	dialConns(o, rep, func(who string, c *net.TCPConn) {
		werr := make(chan error, 1)
		go func() {
			err := writePattern(c, echoBytes, o.seed, &rep.bytesOut)
			if err == nil {
				if cerr := c.CloseWrite(); cerr != nil {
					err = catErr("io-error", "CloseWrite: %v", cerr)
				}
			}
			werr <- err
		}()
		// The echo comes back as the client's own stream (seed S).
		if err := readPattern(c, echoBytes, o.seed, &rep.bytesIn); err != nil {
			rep.failErr("io-error", who+" reader", err)
		}
		if err := <-werr; err != nil {
			rep.failErr("io-error", who+" writer", err)
		}
	})
}

// ---- stream ----------------------------------------------------------------------------------

func streamServer(o *opts, rep *report) {
	serveConns(o, rep, func(who string, c *net.TCPConn) {
		if err := writePattern(c, streamBytes, o.seed+1, &rep.bytesOut); err != nil {
			rep.failErr("io-error", who, err)
		}
	})
}

func streamClient(o *opts, rep *report) {
	dialConns(o, rep, func(who string, c *net.TCPConn) {
		if err := readPattern(c, streamBytes, o.seed+1, &rep.bytesIn); err != nil {
			rep.failErr("io-error", who, err)
		}
	})
}

// ---- proxy -----------------------------------------------------------------------------------

func copyProxy(o *opts, rep *report) {
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		rep.fail("listen", "listen %s: %v", o.listen, err)
		return
	}
	ready()
	acceptN(ln, o.conns, rep, func(idx int, down *net.TCPConn) {
		who := fmt.Sprintf("conn %d", idx)
		defer closeConn(rep, who+" downstream", down)
		uc, err := net.Dial("tcp", o.upstream)
		if err != nil {
			rep.fail("connect", "%s dial upstream %s: %v", who, o.upstream, err)
			return
		}
		up := uc.(*net.TCPConn)
		defer closeConn(rep, who+" upstream", up)
		// pipe copies src to dst with io.Copy (dst.ReadFrom(src): splice(2) on Linux) and then
		// propagates the end of the stream with CloseWrite.
		pipe := func(dir string, dst, src *net.TCPConn, counter *atomic.Int64, done chan<- struct{}) {
			defer close(done)
			n, err := io.Copy(dst, src)
			counter.Add(n)
			if err != nil {
				rep.fail("io-error", "%s %s copy after %d bytes: %v", who, dir, n, err)
			}
			if err := dst.CloseWrite(); err != nil {
				rep.fail("io-error", "%s %s CloseWrite: %v", who, dir, err)
			}
		}
		c2u, u2c := make(chan struct{}), make(chan struct{})
		go pipe("client->upstream", up, down, &rep.bytesIn, c2u)
		go pipe("upstream->client", down, up, &rep.bytesOut, u2c)
		<-c2u
		<-u2c
	})
}

// ---- HTTP ------------------------------------------------------------------------------------

// sameHeaders checks that every request (server) or response (client) of one kind carries
// exactly the header lines of the first one of that kind, Date apart (which must parse and be
// within an hour of the local clock). A byte changed in a header that nothing else looks at (a
// User-Agent, an ETag) is caught that way.
type sameHeaders struct {
	mu    sync.Mutex
	first map[string]string
}

func newSameHeaders() *sameHeaders { return &sameHeaders{first: map[string]string{}} }

func (s *sameHeaders) check(kind, firstLine string, h http.Header) error {
	var lines []string
	for k, vs := range h {
		if k == "Date" {
			if len(vs) != 1 {
				return catErr("header", "%s: %d Date headers", kind, len(vs))
			}
			t, err := http.ParseTime(vs[0])
			if err != nil {
				return catErr("header", "%s: bad Date %q", kind, vs[0])
			}
			if d := time.Since(t); d > time.Hour || d < -time.Hour {
				return catErr("header", "%s: Date %q is off by %v", kind, vs[0], d)
			}
			continue
		}
		for _, v := range vs {
			lines = append(lines, k+": "+v)
		}
	}
	sort.Strings(lines)
	got := firstLine + "\n" + strings.Join(lines, "\n")
	s.mu.Lock()
	defer s.mu.Unlock()
	want, seen := s.first[kind]
	if !seen {
		s.first[kind] = got
		return nil
	}
	if got != want {
		return catErr("header", "%s: headers %q differ from the first ones %q", kind, got, want)
	}
	return nil
}

func httpServer(o *opts, rep *report) {
	var served atomic.Int64
	var conns atomic.Int64
	quit := make(chan struct{})
	var quitOnce sync.Once
	reqHeaders := newSameHeaders()
	checkRequest := func(r *http.Request) {
		first := r.Method + " " + r.RequestURI + " " + r.Proto + " Host=" + r.Host
		if err := reqHeaders.check(r.Method+" "+r.URL.Path, first, r.Header); err != nil {
			rep.failErr("header", "request", err)
		}
	}
	// reply sends body as an octet-stream response and counts it served; a write error is
	// recorded as "PATH write: ERR".
	reply := func(w http.ResponseWriter, path string, body []byte) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		m, err := w.Write(body)
		rep.bytesOut.Add(int64(m))
		if err != nil {
			rep.fail("io-error", "%s write: %v", path, err)
			return
		}
		served.Add(1)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/data", func(w http.ResponseWriter, r *http.Request) {
		checkRequest(r)
		if r.Method != http.MethodGet {
			rep.fail("http", "/data: method %s", r.Method)
			http.Error(w, "GET only", http.StatusMethodNotAllowed)
			return
		}
		n, err := strconv.Atoi(r.URL.Query().Get("n"))
		if err != nil || n < 0 || n > maxHTTPBody {
			rep.fail("http", "/data: bad n %q", r.URL.Query().Get("n"))
			http.Error(w, "bad n", http.StatusBadRequest)
			return
		}
		reply(w, "/data", patternBytes(n, o.seed+1))
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		checkRequest(r)
		if r.Method != http.MethodPost {
			rep.fail("http", "/echo: method %s", r.Method)
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, maxHTTPBody+1))
		rep.bytesIn.Add(int64(len(body)))
		if err != nil {
			rep.fail("io-error", "/echo read body after %d bytes: %v", len(body), err)
			http.Error(w, "read error", http.StatusBadRequest)
			return
		}
		if r.ContentLength >= 0 && int64(len(body)) != r.ContentLength {
			rep.fail("short", "/echo: body %d bytes, Content-Length %d", len(body), r.ContentLength)
		}
		if k := checkPattern(body, 0, o.seed); k >= 0 {
			rep.fail("mismatch", "/echo: body byte %d is %d, expected %d", k, body[k], patternByte(int64(k), o.seed))
		}
		reply(w, "/echo", body)
	})
	mux.HandleFunc("/quit", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "4")
		w.Write([]byte("bye\n"))
		quitOnce.Do(func() { close(quit) })
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		rep.fail("http", "unexpected request %s %s", r.Method, r.URL.Path)
		http.NotFound(w, r)
	})
	srv := &http.Server{
		Handler: mux,
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				conns.Add(1)
			}
		},
	}
	ln, err := listen(o.port)
	if err != nil {
		rep.fail("listen", "listen: %v", err)
		return
	}
	ready()
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	select {
	case <-quit:
	case err := <-serveErr:
		rep.fail("io-error", "serve: %v", err)
		return
	}
	// Shutdown waits for the /quit response to be written and the connections to go idle.
	if err := srv.Shutdown(context.Background()); err != nil {
		rep.fail("io-error", "shutdown: %v", err)
	}
	expected := int64(o.conns * o.requests)
	logf("server go-http: %d requests served on %d connections", served.Load(), conns.Load())
	if served.Load() != expected {
		rep.fail("count", "%d requests served, expected %d", served.Load(), expected)
	}
}

// httpClient is net/http's default Transport (keep-alive) without proxy or compression, with
// room for N idle connections and at most N connections at once: N sequential workers then use
// exactly the connections they dial at first, and any further dial means a keep-alive connection
// was lost (net/http would retry an idempotent request on a new one without telling the app).
func httpClient(o *opts, dials *atomic.Int64) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	tr.MaxIdleConns = 0
	tr.MaxIdleConnsPerHost = o.conns
	tr.MaxConnsPerHost = o.conns
	tr.DisableCompression = true
	dial := tr.DialContext
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return dial(ctx, network, addr)
	}
	return &http.Client{Transport: tr}
}

// httpDo makes req and returns the body (read to EOF), checking status and Content-Length.
// With same non-nil, the response's headers must be those of the first response of its kind.
func httpDo(client *http.Client, req *http.Request, same *sameHeaders) ([]byte, error) {
	resp, err := client.Do(req)
	if err != nil {
		return nil, catErr("io-error", "%s %s: %v", req.Method, req.URL.Path, err)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHTTPBody+1))
	resp.Body.Close()
	if err != nil {
		return nil, catErr("io-error", "%s %s: body after %d bytes: %v", req.Method, req.URL.Path, len(body), err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, catErr("http", "%s %s: status %d", req.Method, req.URL.Path, resp.StatusCode)
	}
	if resp.ContentLength >= 0 && int64(len(body)) != resp.ContentLength {
		return nil, catErr("short", "%s %s: body %d bytes, Content-Length %d", req.Method, req.URL.Path, len(body), resp.ContentLength)
	}
	if same != nil {
		first := fmt.Sprintf("%s %d", resp.Proto, resp.StatusCode)
		if err := same.check(req.Method+" "+req.URL.Path, first, resp.Header); err != nil {
			return nil, err
		}
	}
	return body, nil
}

// runHTTPWorkers runs N goroutines of R requests each, made by one(worker, i).
func runHTTPWorkers(o *opts, rep *report, one func(w, i int) error) {
	var wg sync.WaitGroup
	for w := 0; w < o.conns; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			defer rep.finished.Add(1)
			for i := 0; i < o.requests; i++ {
				if err := one(w, i); err != nil {
					rep.failErr("io-error", fmt.Sprintf("worker %d request %d", w, i), err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
}

// checkDials fails the run when more connections were dialed than there are workers.
func checkDials(o *opts, rep *report, dials *atomic.Int64) {
	logf("client %s: %d connections dialed", rep.mode, dials.Load())
	if dials.Load() > int64(o.conns) {
		rep.fail("reconnect", "%d connections dialed for %d keep-alive workers", dials.Load(), o.conns)
	}
}

func httpGoClient(o *opts, rep *report) {
	var dials atomic.Int64
	client := httpClient(o, &dials)
	base := "http://" + o.target
	want := patternBytes(httpGetSize, o.seed+1)
	post := patternBytes(httpPostLen, o.seed)
	respHeaders := newSameHeaders()
	runHTTPWorkers(o, rep, func(w, i int) error {
		var req *http.Request
		var err error
		expect := want
		if i%2 == 0 {
			req, err = http.NewRequest(http.MethodGet, fmt.Sprintf("%s/data?n=%d", base, httpGetSize), nil)
		} else {
			req, err = http.NewRequest(http.MethodPost, base+"/echo", bytes.NewReader(post))
			if err == nil {
				req.Header.Set("Content-Type", "application/octet-stream")
			}
			expect = post
		}
		if err != nil {
			return catErr("http", "request: %v", err)
		}
		body, err := httpDo(client, req, respHeaders)
		if err != nil {
			return err
		}
		if req.Method == http.MethodPost {
			rep.bytesOut.Add(httpPostLen)
		}
		rep.bytesIn.Add(int64(len(body)))
		return compareBody(req, body, expect)
	})
	// Always tell the server to stop, also after errors.
	req, _ := http.NewRequest(http.MethodGet, base+"/quit", nil)
	if body, err := httpDo(client, req, nil); err != nil {
		rep.failErr("io-error", "quit", err)
	} else if string(body) != "bye\n" {
		rep.fail("http", "quit: body %q", body)
	}
	checkDials(o, rep, &dials)
	client.CloseIdleConnections()
}

func compareBody(req *http.Request, body, expect []byte) error {
	if len(body) != len(expect) {
		return catErr("short", "%s %s: body %d bytes, expected %d", req.Method, req.URL.Path, len(body), len(expect))
	}
	if !bytes.Equal(body, expect) {
		k := 0
		for body[k] == expect[k] {
			k++
		}
		return catErr("mismatch", "%s %s: body byte %d is %d, expected %d", req.Method, req.URL.Path, k, body[k], expect[k])
	}
	return nil
}

func fetchClient(o *opts, rep *report) {
	var dials atomic.Int64
	client := httpClient(o, &dials)
	url := "http://" + o.target + o.path
	want := patternBytes(o.size, o.seed)
	respHeaders := newSameHeaders()
	runHTTPWorkers(o, rep, func(w, i int) error {
		req, err := http.NewRequest(http.MethodGet, url, nil)
		if err != nil {
			return catErr("http", "request: %v", err)
		}
		body, err := httpDo(client, req, respHeaders)
		if err != nil {
			return err
		}
		rep.bytesIn.Add(int64(len(body)))
		return compareBody(req, body, want)
	})
	checkDials(o, rep, &dials)
	client.CloseIdleConnections()
}

// ---- main ------------------------------------------------------------------------------------

type opts struct {
	port, conns, seed, requests, size int
	target, listen, upstream, path    string
	deadline                          float64
}

func usage(why string) {
	fmt.Fprintf(os.Stderr, `conform-go: %s
usage: conform-go server MODE --port P --conns N [--seed S] [--requests R] [--deadline S]
       conform-go client MODE --target IP:PORT --conns N [--seed S] [--requests R] [--deadline S]
                         [--path P --size B]
       conform-go proxy [go-copy-proxy] --listen IP:LP --upstream IP:PORT --conns N [--deadline S]
modes: server: go-http, echo (= go-copy-proxy), go-stream
       client: go-http, go-fetch, echo (= go-copy-proxy), go-stream
`, why)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage("missing SIDE")
	}
	side := os.Args[1]
	args := os.Args[2:]
	mode := ""
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		mode, args = args[0], args[1:]
	}
	if side == "proxy" && mode == "" {
		mode = "go-copy-proxy"
	}
	if mode == "" {
		usage("missing MODE")
	}
	var o opts
	fs := flag.NewFlagSet("conform-go", flag.ContinueOnError)
	fs.IntVar(&o.port, "port", -1, "server: port to listen on (0.0.0.0)")
	fs.IntVar(&o.conns, "conns", 1, "number of connections (HTTP: keep-alive workers)")
	fs.IntVar(&o.seed, "seed", 0, "pattern seed of client-to-server data (server-to-client: seed+1)")
	fs.IntVar(&o.requests, "requests", 300, "HTTP requests per connection")
	fs.IntVar(&o.size, "size", -1, "go-fetch: expected body size")
	fs.StringVar(&o.target, "target", "", "client: IP:PORT to connect to")
	fs.StringVar(&o.listen, "listen", "", "proxy: IP:PORT to listen on")
	fs.StringVar(&o.upstream, "upstream", "", "proxy: IP:PORT to dial for each connection")
	fs.StringVar(&o.path, "path", "/data.bin", "go-fetch: path to GET")
	fs.Float64Var(&o.deadline, "deadline", 20, "seconds after which a run still going reports ok:false, outcome \"stalled\" (0: never)")
	if err := fs.Parse(args); err != nil {
		usage(err.Error())
	}
	if fs.NArg() > 0 {
		usage("unexpected argument " + fs.Arg(0))
	}
	if o.conns < 1 || o.requests < 1 {
		usage("--conns and --requests must be >= 1")
	}
	// Seeds stay in 0..249 so that seed+1 differs from seed modulo 251.
	o.seed = ((o.seed % 250) + 250) % 250
	rep := newReport(side, mode)
	var run func(*opts, *report)
	success := "verified"
	switch side + " " + mode {
	case "server go-http":
		run, success = httpServer, "served"
	case "server echo", "server go-copy-proxy":
		run, success = echoServer, "echoed"
	case "server go-stream":
		run, success = streamServer, "sent"
	case "client go-http":
		run = httpGoClient
	case "client go-fetch":
		if o.size < 0 {
			usage("go-fetch needs --size BYTES")
		}
		run = fetchClient
	case "client echo", "client go-copy-proxy":
		run = echoClient
	case "client go-stream":
		run = streamClient
	case "proxy go-copy-proxy":
		if o.listen == "" || o.upstream == "" {
			usage("proxy needs --listen and --upstream")
		}
		run, success = copyProxy, "relayed"
	default:
		usage("unknown side/mode " + side + " " + mode)
	}
	if side == "server" && (o.port < 0 || o.port > 65535) {
		usage("server needs --port P")
	}
	if side == "client" && o.target == "" {
		usage("client needs --target IP:PORT")
	}
	if o.deadline > 0 {
		go rep.watchdog(time.Duration(o.deadline*float64(time.Second)), o.conns, success)
	}
	run(&o, rep)
	rep.exit(success)
}
