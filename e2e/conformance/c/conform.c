/*
 * conform.c: the C app of meshaccel's application conformance suite.
 *
 *   conform-c server MODE --port P --conns N [--deadline S]
 *   conform-c client MODE --target IP:PORT --conns N [--deadline S]
 *
 * Each mode behaves like a real application using one socket feature (threads on one socket,
 * signals, MSG_WAITALL, SO_RCVLOWAT, MSG_PEEK, SO_RCVTIMEO, FIONREAD, half-close, RST, splice,
 * connect with a timeout, TCP Fast Open) and checks that the socket behaves exactly as plain TCP
 * does. The server prints `ready` once it listens; both sides end with one JSON line on stdout:
 *   {"ok": .., "mode": .., "side": .., "bytes_in": .., "bytes_out": .., "outcome": .., "errors": [..]}
 * and exit 0 (everything as expected) or 1. Diagnostics go to stderr. See ../README.md.
 *
 * Rules this program follows on purpose:
 *  - blocking sockets that return EAGAIN/EWOULDBLOCK are an error, never retried;
 *  - EINTR is retried (and counted) only in mode signal-eintr, which installs a handler without
 *    SA_RESTART, as a POSIX application must; anywhere else it is an error;
 *  - non-blocking sockets (splice-et, tfo-nb; connect-timeout while it connects) wait for EAGAIN
 *    with poll/epoll, with a 5 s limit per wait (longer is `stalled`: a lost wake-up);
 *  - every received byte is checked against the pattern (see pat_init), mismatches give the offset;
 *  - sleeps are protocol pauses only (so that data arrives in separate pieces), never a way to
 *    avoid a race.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define KiB 1024u
#define MiB (1024u * 1024u)

/* Stream seeds: the client's bytes to the server use seed 1, the server's bytes to the client 2. */
#define SEED_C2S 1u
#define SEED_S2C 2u

/* ------------------------------------------------------------------------------------------ */
/* Global state                                                                                */

typedef struct conn {
	int id;
	_Atomic(const char *) stage; /* what the connection is doing now (for the watchdog) */
	_Atomic uint64_t stage_off;  /* stream offset it is at */
	atomic_int nerr;
	atomic_int aborting; /* socket torn down after an error: later errors are consequences */
	atomic_int finished;
	const char *outcome; /* set by the mode's handler when it completed as expected */
	char fail[64];       /* class of the first error (under g_lock) */
} conn_t;

enum sigmode { SIGM_NONE, SIGM_RESTART, SIGM_EINTR };

typedef struct mode {
	const char *name;
	void (*server)(conn_t *c, int fd);
	void (*client)(conn_t *c, int fd);
	int server_concurrent; /* one thread per accepted connection */
	int client_concurrent; /* the client's N connections run at the same time */
	enum sigmode sig;
	const char *expect; /* the outcome of a correct connection; NULL: "eof" or "reset" */
	int (*connect)(conn_t *c); /* client: creates and connects the socket; NULL: client_connect */
	int (*listener)(int ls);   /* server: configures the listener before listen(); may be NULL */
} mode_t_;

static const mode_t_ *g_mode;
static const char *g_side = "?";
static const char *g_mode_name = "?";
static int g_is_server;
static int g_conns = 1;
static int g_port = -1;
static struct sockaddr_in g_target;
static double g_deadline = 20.0;
static conn_t *g_c;

static atomic_ullong g_in, g_out;
static atomic_ulong g_eintr;
static atomic_ulong g_sigalrm;
static int g_eintr_retry; /* signal-eintr: EINTR is retried and counted */
static _Atomic(const char *) g_main_stage = "starting";

#define MAX_ERRS 100
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static char *g_errs[MAX_ERRS];
static int g_nerrs, g_errs_dropped;
static int g_printed;

#define STAGE(c, s, off)                                                                  \
	do {                                                                              \
		atomic_store(&(c)->stage, (s));                                           \
		atomic_store(&(c)->stage_off, (uint64_t)(off));                           \
	} while (0)

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */

static const char *ename(int e)
{
	const char *n = strerrorname_np(e);
	return n ? n : "E?";
}

static const char *edesc(int e)
{
	const char *d = strerrordesc_np(e);
	return d ? d : "unknown error";
}

static void add_err(conn_t *c, const char *cls, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void add_err(conn_t *c, const char *cls, const char *fmt, ...)
{
	char msg[600], full[700];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (c)
		snprintf(full, sizeof full, "%s [conn %d]", msg, c->id);
	else
		snprintf(full, sizeof full, "%s", msg);
	fprintf(stderr, "conform-c %s %s: error: %s\n", g_side, g_mode_name, full);
	pthread_mutex_lock(&g_lock);
	if (g_nerrs < MAX_ERRS)
		g_errs[g_nerrs++] = strdup(full);
	else
		g_errs_dropped++;
	if (c && !c->fail[0])
		snprintf(c->fail, sizeof c->fail, "%s", cls);
	pthread_mutex_unlock(&g_lock);
	if (c)
		atomic_fetch_add(&c->nerr, 1);
}

/* "recv: EAGAIN (Resource temporarily unavailable) while WHAT at offset OFF" */
static void err_sys(conn_t *c, const char *call, int e, const char *what, uint64_t off)
{
	char cls[64];
	snprintf(cls, sizeof cls, "%s-%s", call, ename(e));
	add_err(c, cls, "%s: %s (%s) while %s at offset %" PRIu64, call, ename(e), edesc(e), what,
		off);
}

/* ------------------------------------------------------------------------------------------ */
/* Data pattern                                                                                */
/*
 * Byte i of the stream with seed s is T[(i + 7919*s) mod 65521] where
 *   T[k] = ((31*k + 7) mod 251) XOR (floor(k / 251) mod 256).
 * The period is 65521 bytes (prime), so a dropped, duplicated or reordered piece of any length
 * below that shows up as a mismatch. conform.py uses the same pattern.
 */
#define PAT_LEN 65521u
static uint8_t pat_tab[PAT_LEN];

static void pat_init(void)
{
	for (uint32_t k = 0; k < PAT_LEN; k++)
		pat_tab[k] = (uint8_t)(((31u * k + 7u) % 251u) ^ ((k / 251u) & 0xffu));
}

typedef struct stream {
	uint32_t seed;
	uint64_t off;
	const char *name;
} stream_t;

static void pat_fill(stream_t *s, uint8_t *buf, size_t n)
{
	uint32_t k = (uint32_t)((s->off + 7919ull * s->seed) % PAT_LEN);
	for (size_t j = 0; j < n; j++) {
		buf[j] = pat_tab[k];
		if (++k == PAT_LEN)
			k = 0;
	}
	s->off += n;
}

static int pat_check(conn_t *c, stream_t *s, const uint8_t *buf, size_t n)
{
	uint32_t k = (uint32_t)((s->off + 7919ull * s->seed) % PAT_LEN);
	for (size_t j = 0; j < n; j++) {
		if (buf[j] != pat_tab[k]) {
			add_err(c, "mismatch",
				"data: %s mismatch at offset %" PRIu64 ": got 0x%02x, expected 0x%02x",
				s->name, s->off + j, buf[j], pat_tab[k]);
			s->off += n;
			return -1;
		}
		if (++k == PAT_LEN)
			k = 0;
	}
	s->off += n;
	return 0;
}

/* Deterministic chunk sizes (splitmix64). */
static uint64_t rnd_next(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static size_t rnd_range(uint64_t *s, size_t lo, size_t hi)
{
	return lo + (size_t)(rnd_next(s) % (hi - lo + 1));
}

/* ------------------------------------------------------------------------------------------ */
/* Time                                                                                        */

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* A protocol pause. Signals do not shorten it (absolute deadline, EINTR resumes). */
static void msleep(int ms)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	t.tv_sec += ms / 1000;
	t.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (t.tv_nsec >= 1000000000L) {
		t.tv_sec++;
		t.tv_nsec -= 1000000000L;
	}
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR)
		;
}

/* ------------------------------------------------------------------------------------------ */
/* Socket helpers                                                                              */

static int eintr_retry(void)
{
	if (g_eintr_retry) {
		atomic_fetch_add(&g_eintr, 1);
		return 1;
	}
	return 0;
}

/* recv(); errors (EAGAIN included) are recorded and give -1. MSG_PEEK bytes are not counted. */
static ssize_t xrecv(conn_t *c, int fd, void *buf, size_t len, int flags, const char *what,
		     uint64_t off)
{
	STAGE(c, what, off);
	for (;;) {
		ssize_t r = recv(fd, buf, len, flags);
		if (r >= 0) {
			if (!(flags & MSG_PEEK))
				atomic_fetch_add(&g_in, (unsigned long long)r);
			return r;
		}
		int e = errno;
		if (e == EINTR && eintr_retry())
			continue;
		const char *call = (flags & MSG_PEEK) && (flags & MSG_WAITALL)
					   ? "recv(MSG_PEEK|MSG_WAITALL)"
				   : (flags & MSG_PEEK)	   ? "recv(MSG_PEEK)"
				   : (flags & MSG_WAITALL) ? "recv(MSG_WAITALL)"
							   : "recv";
		if (!atomic_load(&c->aborting))
			err_sys(c, call, e, what, off);
		return -1;
	}
}

/* send() all of buf (a blocking send may legally return a short count: continue after it). */
static int xsend(conn_t *c, int fd, const void *buf, size_t len, const char *what, uint64_t off)
{
	size_t done = 0;
	STAGE(c, what, off);
	while (done < len) {
		ssize_t r = send(fd, (const uint8_t *)buf + done, len - done, MSG_NOSIGNAL);
		if (r > 0) {
			done += (size_t)r;
			atomic_fetch_add(&g_out, (unsigned long long)r);
			continue;
		}
		int e = r == 0 ? EIO : errno;
		if (r < 0 && e == EINTR && eintr_retry())
			continue;
		if (!atomic_load(&c->aborting))
			err_sys(c, "send", e, what, off + done);
		return -1;
	}
	return 0;
}

/* Sends `total` bytes of stream s in chunks of lo..hi bytes; pauses pause_ms after every
 * pause_every bytes (0: never). */
static int send_stream(conn_t *c, int fd, stream_t *s, uint64_t total, size_t lo, size_t hi,
		       uint64_t rng, uint64_t pause_every, int pause_ms, const char *what)
{
	static __thread uint8_t buf[64 * KiB];
	uint64_t sent = 0, next_pause = pause_every;
	while (sent < total) {
		size_t n = lo == hi ? lo : rnd_range(&rng, lo, hi);
		if (n > sizeof buf)
			n = sizeof buf;
		if (n > total - sent)
			n = (size_t)(total - sent);
		if (pause_every && n > next_pause - sent)
			n = (size_t)(next_pause - sent);
		uint64_t off = s->off;
		pat_fill(s, buf, n);
		if (xsend(c, fd, buf, n, what, off) < 0)
			return -1;
		sent += n;
		if (pause_every && sent == next_pause && sent < total) {
			msleep(pause_ms);
			next_pause += pause_every;
		}
	}
	return 0;
}

/* Receives exactly len bytes (several recv calls allowed); EOF before that is an error. */
static int recv_exact(conn_t *c, int fd, void *buf, size_t len, const char *what, uint64_t off)
{
	size_t got = 0;
	while (got < len) {
		ssize_t r = xrecv(c, fd, (uint8_t *)buf + got, len - got, 0, what, off + got);
		if (r < 0)
			return -1;
		if (r == 0) {
			add_err(c, "premature-eof",
				"recv: EOF after %zu of %zu bytes while %s at offset %" PRIu64, got,
				len, what, off + got);
			return -1;
		}
		got += (size_t)r;
	}
	return 0;
}

/* Receives stream s until EOF with recv(bufsz) and checks that exactly `total` bytes came. */
static int recv_stream_eof(conn_t *c, int fd, stream_t *s, uint64_t total, size_t bufsz,
			   const char *what)
{
	static __thread uint8_t buf[64 * KiB];
	uint64_t start = s->off;
	if (bufsz > sizeof buf)
		bufsz = sizeof buf;
	for (;;) {
		ssize_t r = xrecv(c, fd, buf, bufsz, 0, what, s->off);
		if (r < 0)
			return -1;
		if (r == 0)
			break;
		if (pat_check(c, s, buf, (size_t)r) < 0)
			return -1;
		if (s->off - start > total) {
			add_err(c, "extra-data",
				"recv: %" PRIu64 " bytes while %s, more than the %" PRIu64
				" bytes the peer sends",
				s->off - start, what, total);
			return -1;
		}
	}
	if (s->off - start != total) {
		add_err(c, "premature-eof",
			"recv: EOF after %" PRIu64 " of %" PRIu64 " bytes while %s", s->off - start,
			total, what);
		return -1;
	}
	return 0;
}

static int expect_eof(conn_t *c, int fd, const char *what, uint64_t off)
{
	uint8_t b[256];
	ssize_t r = xrecv(c, fd, b, sizeof b, 0, what, off);
	if (r < 0)
		return -1;
	if (r > 0) {
		add_err(c, "extra-data",
			"recv: %zd unexpected bytes instead of EOF while %s at offset %" PRIu64, r,
			what, off);
		return -1;
	}
	return 0;
}

static int send_ctrl(conn_t *c, int fd, const char *msg)
{
	return xsend(c, fd, msg, strlen(msg), "sending a control message", 0);
}

/* Reads the control message `msg` (recv(len, MSG_WAITALL)). */
static int expect_ctrl(conn_t *c, int fd, const char *msg)
{
	char b[16];
	size_t len = strlen(msg);
	ssize_t r = xrecv(c, fd, b, len, MSG_WAITALL, "waiting for a control message", 0);
	if (r < 0)
		return -1;
	if ((size_t)r != len || memcmp(b, msg, len) != 0) {
		add_err(c, r == 0 ? "premature-eof" : "bad-control",
			"recv(MSG_WAITALL): got %zd bytes \"%.*s\", expected control message \"%s\"",
			r, (int)(r > 0 ? r : 0), b, msg);
		return -1;
	}
	return 0;
}

/* shutdown(SHUT_WR): ends the outgoing stream; a failure is recorded and gives -1. */
static int shut_wr(conn_t *c, int fd, const char *what, uint64_t off)
{
	if (shutdown(fd, SHUT_WR) < 0) {
		err_sys(c, "shutdown(SHUT_WR)", errno, what, off);
		return -1;
	}
	return 0;
}

/* Ends the outgoing stream at offset out_off, then reads the control message `msg` and EOF. */
static int end_then_ctrl_eof(conn_t *c, int fd, uint64_t out_off, const char *msg,
			     uint64_t eof_off)
{
	if (shut_wr(c, fd, "ending the stream", out_off) < 0 || expect_ctrl(c, fd, msg) < 0 ||
	    expect_eof(c, fd, "waiting for EOF", eof_off) < 0)
		return -1;
	return 0;
}

static int set_int_opt(conn_t *c, int fd, int level, int opt, int val, const char *name)
{
	if (setsockopt(fd, level, opt, &val, sizeof val) < 0) {
		char call[64];
		snprintf(call, sizeof call, "setsockopt(%s)", name);
		err_sys(c, call, errno, "configuring the socket", 0);
		return -1;
	}
	return 0;
}

/* poll(POLLIN): revents (> 0), 0 on timeout, -1 on error. */
static int poll_in(conn_t *c, int fd, int timeout_ms, const char *what, uint64_t off)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	STAGE(c, what, off);
	for (;;) {
		int r = poll(&p, 1, timeout_ms);
		if (r > 0)
			return p.revents;
		if (r == 0)
			return 0;
		int e = errno;
		if (e == EINTR && eintr_retry())
			continue;
		err_sys(c, "poll", e, what, off);
		return -1;
	}
}

/* ------------------------------------------------------------------------------------------ */
/* Mode threads: a reader thread and a writer thread on one blocking socket, 2 MiB each way.   */

#define THREADS_BYTES (2u * MiB)

struct writer_arg {
	conn_t *c;
	int fd;
	uint32_t seed;
};

static void *threads_writer(void *p)
{
	struct writer_arg *a = p;
	stream_t s = { a->seed, 0, "outgoing stream" };
	if (send_stream(a->c, a->fd, &s, THREADS_BYTES, 1, 64 * KiB,
			a->seed * 1000003ull + (uint64_t)a->c->id, 0, 0,
			"writer thread sending 2 MiB") < 0)
		return NULL;
	if (shutdown(a->fd, SHUT_WR) < 0 && !atomic_load(&a->c->aborting))
		err_sys(a->c, "shutdown(SHUT_WR)", errno, "ending the outgoing stream", s.off);
	return NULL;
}

static void duplex(conn_t *c, int fd, uint32_t out_seed, uint32_t in_seed)
{
	pthread_t t;
	struct writer_arg a = { c, fd, out_seed };
	int e = pthread_create(&t, NULL, threads_writer, &a);
	if (e) {
		err_sys(c, "pthread_create", e, "starting the writer thread", 0);
		return;
	}
	stream_t in = { in_seed, 0, "peer's stream" };
	if (recv_stream_eof(c, fd, &in, THREADS_BYTES, 16 * KiB, "reader thread reading 2 MiB") <
	    0) {
		/* Unblock our writer: it may wait for a peer that stopped reading. */
		atomic_store(&c->aborting, 1);
		shutdown(fd, SHUT_RDWR);
	}
	pthread_join(t, NULL);
	c->outcome = "ok";
}

static void threads_server(conn_t *c, int fd) { duplex(c, fd, SEED_S2C, SEED_C2S); }
static void threads_client(conn_t *c, int fd) { duplex(c, fd, SEED_C2S, SEED_S2C); }

/* ------------------------------------------------------------------------------------------ */
/* Modes signal-restart / signal-eintr: a 1 ms SIGALRM interval timer during blocking I/O.     */

#define SIG_REQ 100u
#define SIG_CHUNK (4u * KiB)
#define SIG_NCHUNK 20u

static void sig_server(conn_t *c, int fd)
{
	uint8_t req[SIG_REQ];
	stream_t in = { SEED_C2S, 0, "request" }, out = { SEED_S2C, 0, "response" };
	/* The client sends the request 100 ms after connecting: we block in recv meanwhile. */
	if (recv_exact(c, fd, req, SIG_REQ, "reading the 100-byte request", 0) < 0)
		return;
	if (pat_check(c, &in, req, SIG_REQ) < 0)
		return;
	for (unsigned i = 0; i < SIG_NCHUNK; i++) {
		if (send_stream(c, fd, &out, SIG_CHUNK, SIG_CHUNK, SIG_CHUNK, 0, 0, 0,
				"sending a 4 KiB response chunk") < 0)
			return;
		msleep(20);
	}
	c->outcome = "ok";
}

static void sig_client(conn_t *c, int fd)
{
	stream_t out = { SEED_C2S, 0, "request" }, in = { SEED_S2C, 0, "response" };
	msleep(100);
	if (send_stream(c, fd, &out, SIG_REQ, SIG_REQ, SIG_REQ, 0, 0, 0, "sending the request") < 0)
		return;
	if (recv_stream_eof(c, fd, &in, SIG_CHUNK * SIG_NCHUNK, 16 * KiB,
			    "reading the 20 x 4 KiB response") < 0)
		return;
	c->outcome = "ok";
}

static void on_sigalrm(int sig)
{
	(void)sig;
	atomic_fetch_add_explicit(&g_sigalrm, 1, memory_order_relaxed);
}

static void timer_start(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_sigalrm;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = g_mode->sig == SIGM_RESTART ? SA_RESTART : 0;
	if (sigaction(SIGALRM, &sa, NULL) < 0)
		err_sys(NULL, "sigaction", errno, "installing the SIGALRM handler", 0);
	struct itimerval it = { { 0, 1000 }, { 0, 1000 } };
	if (setitimer(ITIMER_REAL, &it, NULL) < 0)
		err_sys(NULL, "setitimer", errno, "starting the 1 ms interval timer", 0);
	g_eintr_retry = g_mode->sig == SIGM_EINTR;
}

static void timer_stop(void)
{
	struct itimerval it;
	memset(&it, 0, sizeof it);
	setitimer(ITIMER_REAL, &it, NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* Mode waitall: header and body read with one recv(MSG_WAITALL) each, sent in pieces.         */

#define WA_BODY 300000u

static void waitall_server(conn_t *c, int fd)
{
	uint8_t hdr[4];
	ssize_t r = xrecv(c, fd, hdr, 4, MSG_WAITALL, "recv(4, MSG_WAITALL) of the header", 0);
	if (r < 0)
		return;
	if (r != 4) {
		add_err(c, "waitall-short",
			"recv(MSG_WAITALL): returned %zd of 4 header bytes (sent as 2 + 2 bytes 50 ms "
			"apart)",
			r);
		return;
	}
	uint32_t be;
	memcpy(&be, hdr, 4);
	uint32_t len = ntohl(be);
	if (len != WA_BODY) {
		add_err(c, "bad-header", "header: body length %u, expected %u", len, WA_BODY);
		return;
	}
	uint8_t *body = malloc(len);
	if (!body) {
		add_err(c, "malloc", "malloc: out of memory");
		return;
	}
	r = xrecv(c, fd, body, len, MSG_WAITALL, "recv(len, MSG_WAITALL) of the body", 4);
	if (r >= 0 && (size_t)r != len)
		add_err(c, "waitall-short",
			"recv(MSG_WAITALL): returned %zd of %u body bytes (sent in 3 pieces 30 ms "
			"apart)",
			r, len);
	if (r == (ssize_t)len) {
		stream_t in = { SEED_C2S, 0, "body" };
		if (pat_check(c, &in, body, len) == 0 && send_ctrl(c, fd, "done") == 0)
			c->outcome = "ok";
	}
	free(body);
}

static void waitall_client(conn_t *c, int fd)
{
	if (set_int_opt(c, fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY") < 0)
		return;
	uint8_t hdr[4];
	uint32_t be = htonl(WA_BODY);
	memcpy(hdr, &be, 4);
	if (xsend(c, fd, hdr, 2, "sending the header's first half", 0) < 0)
		return;
	msleep(50);
	if (xsend(c, fd, hdr + 2, 2, "sending the header's second half", 2) < 0)
		return;
	stream_t out = { SEED_C2S, 0, "body" };
	for (int i = 0; i < 3; i++) {
		uint64_t n = i < 2 ? WA_BODY / 3 : WA_BODY - 2 * (WA_BODY / 3);
		if (send_stream(c, fd, &out, n, n, n, 0, 0, 0, "sending a third of the body") < 0)
			return;
		if (i < 2)
			msleep(30);
	}
	uint8_t rep[4];
	ssize_t r = xrecv(c, fd, rep, 4, MSG_WAITALL, "recv(4, MSG_WAITALL) of the reply", 0);
	if (r < 0)
		return;
	if (r != 4 || memcmp(rep, "done", 4) != 0) {
		add_err(c, r == 4 ? "bad-reply" : "waitall-short",
			"recv(MSG_WAITALL): returned %zd bytes, expected the 4-byte reply \"done\"", r);
		return;
	}
	if (expect_eof(c, fd, "waiting for EOF after the reply", 4) < 0)
		return;
	c->outcome = "ok";
}

/* ------------------------------------------------------------------------------------------ */
/* Mode rcvlowat: SO_RCVLOWAT honoured by blocking recv() and by poll().                        */
/*
 * Client → server stream: 500 B | G | 600 B | B | 10 x 300 B (20 ms apart) | C | 700 B, EOF | E
 * (letters: one-byte control messages from the server to the client).
 *  1. SO_RCVLOWAT 500: poll(5 s) becomes readable once all 500 bytes are queued.
 *     SO_RCVLOWAT 1000: poll(100 ms) must time out (500 < 1000 queued; nothing more is coming
 *     until the server sends G, so this is deterministic).
 *  2. G: the client sends 600 more; poll(5 s) must become readable, recv(4096) must give >= 1000.
 *  3. B: 3000 bytes in 300-byte pieces; while >= 1000 bytes are still to come, every blocking
 *     recv(4096) must return >= 1000 (it waits for SO_RCVLOWAT bytes).
 *  4. C: a last 700 bytes and EOF; each recv must return >= min(1000, bytes still to come), the
 *     last one returns what is left at EOF; then recv returns 0.
 */
#define LOWAT 1000

static void rcvlowat_server(conn_t *c, int fd)
{
	uint8_t buf[4096];
	stream_t in = { SEED_C2S, 0, "client stream" };
	uint64_t pending;
	ssize_t r;
	int p;

	if (set_int_opt(c, fd, SOL_SOCKET, SO_RCVLOWAT, 500, "SO_RCVLOWAT") < 0)
		return;
	p = poll_in(c, fd, 5000, "poll(POLLIN) with SO_RCVLOWAT 500 for the first 500 bytes", 0);
	if (p < 0)
		return;
	if (p == 0) {
		add_err(c, "stalled",
			"poll: not readable within 5 s with SO_RCVLOWAT 500, although the client "
			"sent 500 bytes");
		return;
	}
	if (set_int_opt(c, fd, SOL_SOCKET, SO_RCVLOWAT, LOWAT, "SO_RCVLOWAT") < 0)
		return;
	p = poll_in(c, fd, 100, "poll(POLLIN, 100 ms) with 500 bytes queued, SO_RCVLOWAT 1000", 0);
	if (p < 0)
		return;
	if (p > 0) {
		add_err(c, "lowat-poll-early",
			"poll: readable (revents 0x%x) with only 500 bytes queued, below SO_RCVLOWAT "
			"1000",
			p);
		return;
	}
	if (send_ctrl(c, fd, "G") < 0)
		return;
	p = poll_in(c, fd, 5000, "poll(POLLIN) with 1100 bytes sent, SO_RCVLOWAT 1000", 0);
	if (p < 0)
		return;
	if (p == 0) {
		add_err(c, "stalled",
			"poll: not readable within 5 s with SO_RCVLOWAT 1000, although the client "
			"sent 1100 bytes");
		return;
	}
	r = xrecv(c, fd, buf, sizeof buf, 0, "recv(4096) after poll, SO_RCVLOWAT 1000", in.off);
	if (r < 0)
		return;
	if (r < LOWAT) {
		add_err(c, "lowat-short",
			"recv: returned %zd bytes after poll, below SO_RCVLOWAT 1000 (1100 bytes sent)",
			r);
		return;
	}
	if (pat_check(c, &in, buf, (size_t)r) < 0)
		return;
	pending = 1100 - (uint64_t)r;

	if (send_ctrl(c, fd, "B") < 0)
		return;
	pending += 3000;
	int phase_eof = 0;
	for (int phase = 0; phase < 2; phase++) {
		if (phase == 1) {
			if (send_ctrl(c, fd, "C") < 0)
				return;
			pending += 700;
			phase_eof = 1;
		}
		/* phase 0: while >= 1000 bytes are still to come; phase 1: until all came. */
		while (phase == 0 ? pending >= LOWAT : pending > 0) {
			r = xrecv(c, fd, buf, sizeof buf, 0, "blocking recv(4096), SO_RCVLOWAT 1000",
				  in.off);
			if (r < 0)
				return;
			if (r == 0) {
				add_err(c, "premature-eof",
					"recv: EOF with %" PRIu64
					" bytes still to come at offset %" PRIu64,
					pending, in.off);
				return;
			}
			uint64_t need = pending < LOWAT ? pending : LOWAT;
			if ((uint64_t)r < need) {
				add_err(c, "lowat-short",
					"recv: returned %zd bytes at offset %" PRIu64 " with %" PRIu64
					" bytes still to come%s; SO_RCVLOWAT 1000 requires %" PRIu64,
					r, in.off, pending, phase_eof ? " before EOF" : "", need);
				return;
			}
			if ((uint64_t)r > pending) {
				add_err(c, "extra-data",
					"recv: returned %zd bytes, more than the %" PRIu64
					" the client sent",
					r, pending);
				return;
			}
			if (pat_check(c, &in, buf, (size_t)r) < 0)
				return;
			pending -= (uint64_t)r;
		}
	}
	if (expect_eof(c, fd, "waiting for EOF, SO_RCVLOWAT 1000", in.off) < 0)
		return;
	if (send_ctrl(c, fd, "E") < 0)
		return;
	c->outcome = "ok";
}

static void rcvlowat_client(conn_t *c, int fd)
{
	stream_t out = { SEED_C2S, 0, "client stream" };
	if (set_int_opt(c, fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY") < 0)
		return;
	if (send_stream(c, fd, &out, 500, 500, 500, 0, 0, 0, "sending 500 bytes") < 0 ||
	    expect_ctrl(c, fd, "G") < 0 ||
	    send_stream(c, fd, &out, 600, 600, 600, 0, 0, 0, "sending 600 bytes") < 0 ||
	    expect_ctrl(c, fd, "B") < 0)
		return;
	if (send_stream(c, fd, &out, 3000, 300, 300, 0, 300, 20,
			"sending 10 x 300 bytes 20 ms apart") < 0)
		return;
	if (expect_ctrl(c, fd, "C") < 0 ||
	    send_stream(c, fd, &out, 700, 700, 700, 0, 0, 0, "sending the last 700 bytes") < 0)
		return;
	if (end_then_ctrl_eof(c, fd, out.off, "E", 1) < 0)
		return;
	c->outcome = "ok";
}

/* ------------------------------------------------------------------------------------------ */
/* Mode peek: MSG_PEEK and MSG_PEEK|MSG_WAITALL, then the same bytes with a plain recv.        */
/*
 * Phase 1: 10 records of 100 bytes, each written as 50 + 50 bytes 20 ms apart; the server peeks
 * each with ONE recv(100, MSG_PEEK|MSG_WAITALL) (must wait for the second half and return exactly
 * 100), peeks again, reads it with recv(100), acks with 'K'; the client waits for the ack.
 * Phase 2: 1 MiB in random-sized writes, then EOF; the server peeks with recv(100, MSG_PEEK),
 * peeks again, and reads exactly the peeked count with recv; at the end MSG_PEEK sees EOF.
 *
 * MSG_PEEK|MSG_WAITALL is only used where the queue is otherwise empty: on plain Linux TCP it can
 * wait forever when the bytes it waits for do not fit into the receive buffer next to a partly
 * read large skb (peeking frees nothing, the window stays closed), so it must not be used on
 * the bulk stream.
 */
#define PEEK_RECORDS 10
#define PEEK_TOTAL (1u * MiB)

/* Peeks `want` bytes (waitall: one recv(MSG_PEEK|MSG_WAITALL) that must return all of them),
 * peeks again, then reads the peeked bytes with recv; all three must agree. Returns the count
 * read, 0 at EOF, -1 on error. */
static ssize_t peek_then_read(conn_t *c, int fd, stream_t *in, size_t want, int waitall)
{
	uint8_t a[100], a2[100], b[100];
	int fl = MSG_PEEK | (waitall ? MSG_WAITALL : 0);
	ssize_t p = xrecv(c, fd, a, want, fl,
			  waitall ? "recv(100, MSG_PEEK|MSG_WAITALL)" : "recv(100, MSG_PEEK)", in->off);
	if (p <= 0)
		return p;
	if (waitall && (size_t)p != want) {
		add_err(c, "peek-waitall-short",
			"recv(MSG_PEEK|MSG_WAITALL): returned %zd of %zu bytes at offset %" PRIu64, p,
			want, in->off);
		return -1;
	}
	/* Peeking again must see the same bytes (maybe more of them). */
	ssize_t p2 = xrecv(c, fd, a2, want, MSG_PEEK, "second recv(MSG_PEEK)", in->off);
	if (p2 < 0)
		return -1;
	if (p2 < p || memcmp(a, a2, (size_t)p) != 0) {
		add_err(c, "peek-unstable",
			"recv(MSG_PEEK): a second peek returned %zd bytes differing from the first "
			"peek's %zd at offset %" PRIu64,
			p2, p, in->off);
		return -1;
	}
	ssize_t r = xrecv(c, fd, b, (size_t)p, 0, "recv of the peeked bytes", in->off);
	if (r < 0)
		return -1;
	if (r != p || memcmp(a, b, (size_t)p) != 0) {
		add_err(c, "peek-mismatch",
			"recv: returned %zd bytes that differ from the %zd peeked at offset %" PRIu64, r,
			p, in->off);
		return -1;
	}
	if (pat_check(c, in, b, (size_t)r) < 0)
		return -1;
	return r;
}

static void peek_server(conn_t *c, int fd)
{
	stream_t in = { SEED_C2S, 0, "client stream" };
	for (int i = 0; i < PEEK_RECORDS; i++) {
		ssize_t r = peek_then_read(c, fd, &in, 100, 1);
		if (r < 0)
			return;
		if (r == 0) {
			add_err(c, "premature-eof",
				"recv(MSG_PEEK|MSG_WAITALL): EOF at offset %" PRIu64, in.off);
			return;
		}
		if (send_ctrl(c, fd, "K") < 0)
			return;
	}
	uint64_t end = (uint64_t)PEEK_RECORDS * 100 + PEEK_TOTAL;
	while (in.off < end) {
		size_t want = end - in.off < 100 ? (size_t)(end - in.off) : 100;
		ssize_t r = peek_then_read(c, fd, &in, want, 0);
		if (r < 0)
			return;
		if (r == 0) {
			add_err(c, "premature-eof",
				"recv(MSG_PEEK): EOF at offset %" PRIu64 " of %" PRIu64, in.off, end);
			return;
		}
	}
	uint8_t a[100];
	ssize_t p = xrecv(c, fd, a, 100, MSG_PEEK, "recv(MSG_PEEK) expecting EOF", in.off);
	if (p < 0)
		return;
	if (p != 0) {
		add_err(c, "extra-data", "recv(MSG_PEEK): %zd bytes after the stream instead of EOF",
			p);
		return;
	}
	if (expect_eof(c, fd, "recv expecting EOF", in.off) < 0 || send_ctrl(c, fd, "done") < 0)
		return;
	c->outcome = "ok";
}

static void peek_client(conn_t *c, int fd)
{
	stream_t out = { SEED_C2S, 0, "client stream" };
	if (set_int_opt(c, fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY") < 0)
		return;
	for (int i = 0; i < PEEK_RECORDS; i++) {
		if (send_stream(c, fd, &out, 100, 50, 50, 0, 50, 20,
				"sending a 100-byte record as 50 + 50 bytes 20 ms apart") < 0 ||
		    expect_ctrl(c, fd, "K") < 0)
			return;
	}
	if (send_stream(c, fd, &out, PEEK_TOTAL, 1, 32 * KiB, 77 + (uint64_t)c->id, 0, 0,
			"sending 1 MiB in random-sized writes") < 0)
		return;
	if (end_then_ctrl_eof(c, fd, out.off, "done", 4) < 0)
		return;
	c->outcome = "ok";
}

/* ------------------------------------------------------------------------------------------ */
/* Mode rcvtimeo: SO_RCVTIMEO 300 ms, the server answers after 1000 ms.                        */

#define RT_TIMEO_MS 300
#define RT_MIN_MS 280.0
#define RT_DELAY_MS 1000
#define RT_MAX_EXPIRIES 10
#define RT_RESP (64u * KiB)

static void rcvtimeo_server(conn_t *c, int fd)
{
	uint8_t req[100];
	stream_t in = { SEED_C2S, 0, "request" }, out = { SEED_S2C, 0, "response" };
	if (recv_exact(c, fd, req, sizeof req, "reading the request", 0) < 0 ||
	    pat_check(c, &in, req, sizeof req) < 0)
		return;
	STAGE(c, "waiting 1000 ms before answering", 0);
	msleep(RT_DELAY_MS);
	if (send_stream(c, fd, &out, RT_RESP, RT_RESP, RT_RESP, 0, 0, 0, "sending the response") <
	    0)
		return;
	if (shut_wr(c, fd, "ending the response", out.off) < 0)
		return;
	if (expect_eof(c, fd, "waiting for the client's EOF", 100) < 0)
		return;
	c->outcome = "ok";
}

static void rcvtimeo_client(conn_t *c, int fd)
{
	static __thread uint8_t buf[16 * KiB];
	struct timeval tv = { 0, RT_TIMEO_MS * 1000 };
	if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) {
		err_sys(c, "setsockopt(SO_RCVTIMEO)", errno, "configuring the socket", 0);
		return;
	}
	stream_t out = { SEED_C2S, 0, "request" }, in = { SEED_S2C, 0, "response" };
	if (send_stream(c, fd, &out, 100, 100, 100, 0, 0, 0, "sending the request") < 0)
		return;
	int expiries = 0, first = 1, timed_out_first = 0;
	for (;;) {
		STAGE(c, "recv with SO_RCVTIMEO 300 ms", in.off);
		double t0 = now_ms();
		ssize_t r = recv(fd, buf, sizeof buf, 0);
		double dt = now_ms() - t0;
		if (r < 0) {
			int e = errno;
			if (e == EAGAIN || e == EWOULDBLOCK) {
				if (dt < RT_MIN_MS) {
					add_err(c, "timeout-early",
						"recv: %s (%s) after %.1f ms, before SO_RCVTIMEO %d ms "
						"expired (at offset %" PRIu64 ")",
						ename(e), edesc(e), dt, RT_TIMEO_MS, in.off);
					return;
				}
				if (first)
					timed_out_first = 1;
				first = 0;
				if (++expiries > RT_MAX_EXPIRIES) {
					add_err(c, "no-data",
						"recv: %s (%s) %d times in a row; the response never came "
						"(offset %" PRIu64 ")",
						ename(e), edesc(e), expiries, in.off);
					return;
				}
				continue;
			}
			err_sys(c, "recv", e, "reading the response with SO_RCVTIMEO", in.off);
			return;
		}
		atomic_fetch_add(&g_in, (unsigned long long)r);
		if (first) {
			add_err(c, "no-timeout",
				"recv: returned %zd after %.1f ms, before the server answers (it waits "
				"%d ms); expected EAGAIN after SO_RCVTIMEO %d ms",
				r, dt, RT_DELAY_MS, RT_TIMEO_MS);
			return;
		}
		if (r == 0)
			break;
		if (pat_check(c, &in, buf, (size_t)r) < 0)
			return;
	}
	if (in.off != RT_RESP) {
		add_err(c, "premature-eof", "recv: EOF after %" PRIu64 " of %u response bytes",
			in.off, RT_RESP);
		return;
	}
	fprintf(stderr, "conform-c client rcvtimeo: conn %d: %d timeout(s) before the response\n",
		c->id, expiries);
	if (timed_out_first)
		c->outcome = "timeout-then-data";
}

/* ------------------------------------------------------------------------------------------ */
/* Mode fionread: poll, then ioctl(FIONREAD)/ioctl(SIOCINQ), then recv exactly that many.      */

#define FR_TOTAL (64u * KiB)

static void fionread_server(conn_t *c, int fd)
{
	static __thread uint8_t buf[FR_TOTAL];
	stream_t in = { SEED_C2S, 0, "client stream" };
	while (in.off < FR_TOTAL) {
		int p = poll_in(c, fd, 5000, "poll(POLLIN) before ioctl(FIONREAD)", in.off);
		if (p < 0)
			return;
		if (p == 0) {
			add_err(c, "stalled",
				"poll: not readable within 5 s at offset %" PRIu64 " of %u", in.off,
				FR_TOTAL);
			return;
		}
		int n = -1, m = -1;
		if (ioctl(fd, FIONREAD, &n) < 0) {
			err_sys(c, "ioctl(FIONREAD)", errno, "asking how much is queued", in.off);
			return;
		}
		if (ioctl(fd, SIOCINQ, &m) < 0) {
			err_sys(c, "ioctl(SIOCINQ)", errno, "asking how much is queued", in.off);
			return;
		}
		uint64_t left = FR_TOTAL - in.off;
		if (n <= 0) {
			add_err(c, "fionread-zero",
				"ioctl(FIONREAD): %d bytes queued although poll reported readable "
				"(revents 0x%x) at offset %" PRIu64,
				n, p, in.off);
			return;
		}
		if ((uint64_t)n > left) {
			add_err(c, "fionread-too-big",
				"ioctl(FIONREAD): %d bytes queued, but only %" PRIu64
				" more were sent (offset %" PRIu64 ")",
				n, left, in.off);
			return;
		}
		if (m < n || (uint64_t)m > left) {
			add_err(c, "siocinq-mismatch",
				"ioctl(SIOCINQ): %d bytes queued right after ioctl(FIONREAD) said %d "
				"(offset %" PRIu64 ")",
				m, n, in.off);
			return;
		}
		ssize_t r = xrecv(c, fd, buf, (size_t)n, 0, "recv of the FIONREAD count", in.off);
		if (r < 0)
			return;
		if (r != n) {
			add_err(c, "fionread-short",
				"recv(%d): returned %zd although ioctl(FIONREAD) said %d bytes were queued "
				"(offset %" PRIu64 ")",
				n, r, n, in.off);
			return;
		}
		if (pat_check(c, &in, buf, (size_t)r) < 0)
			return;
	}
	if (send_ctrl(c, fd, "A") < 0)
		return;
	int p = poll_in(c, fd, 5000, "poll(POLLIN) for the client's EOF", in.off);
	if (p < 0)
		return;
	if (p == 0) {
		add_err(c, "stalled", "poll: the client's EOF was not readable within 5 s");
		return;
	}
	int n = -1;
	if (ioctl(fd, FIONREAD, &n) < 0) {
		err_sys(c, "ioctl(FIONREAD)", errno, "asking how much is queued at EOF", in.off);
		return;
	}
	if (n != 0) {
		add_err(c, "fionread-eof", "ioctl(FIONREAD): %d bytes queued at EOF, expected 0", n);
		return;
	}
	if (expect_eof(c, fd, "recv expecting EOF", in.off) < 0)
		return;
	c->outcome = "ok";
}

static void fionread_client(conn_t *c, int fd)
{
	stream_t out = { SEED_C2S, 0, "client stream" };
	if (send_stream(c, fd, &out, FR_TOTAL, 1, 8 * KiB, 99 + (uint64_t)c->id, 16 * KiB, 10,
			"sending 64 KiB") < 0)
		return;
	if (expect_ctrl(c, fd, "A") < 0)
		return;
	c->outcome = "ok";
}

/* ------------------------------------------------------------------------------------------ */
/* Mode halfclose: request, shutdown(SHUT_WR), response after the server saw EOF.              */

#define HC_REQ (10u * KiB)
#define HC_RESP (100u * KiB)

static void halfclose_server(conn_t *c, int fd)
{
	stream_t in = { SEED_C2S, 0, "request" }, out = { SEED_S2C, 0, "response" };
	if (recv_stream_eof(c, fd, &in, HC_REQ, 16 * KiB, "reading the request until EOF") < 0)
		return;
	if (send_stream(c, fd, &out, HC_RESP, 1, 16 * KiB, 5, 0, 0, "sending the response") < 0)
		return;
	c->outcome = "eof";
}

static void halfclose_client(conn_t *c, int fd)
{
	stream_t out = { SEED_C2S, 0, "request" }, in = { SEED_S2C, 0, "response" };
	if (send_stream(c, fd, &out, HC_REQ, 1, 4 * KiB, 6 + (uint64_t)c->id, 0, 0,
			"sending the request") < 0)
		return;
	if (shut_wr(c, fd, "half-closing after the request", out.off) < 0)
		return;
	if (recv_stream_eof(c, fd, &in, HC_RESP, 16 * KiB, "reading the response until EOF") < 0)
		return;
	c->outcome = "eof";
}

/* ------------------------------------------------------------------------------------------ */
/* Mode rst: the server reads the request and closes with SO_LINGER {1, 0} (RST).              */

#define RST_REQ (1u * KiB)

static void rst_server(conn_t *c, int fd)
{
	uint8_t req[RST_REQ];
	stream_t in = { SEED_C2S, 0, "request" };
	if (recv_exact(c, fd, req, sizeof req, "reading the request", 0) < 0 ||
	    pat_check(c, &in, req, sizeof req) < 0)
		return;
	struct linger lg = { 1, 0 };
	if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) < 0) {
		err_sys(c, "setsockopt(SO_LINGER)", errno, "preparing the RST", RST_REQ);
		return;
	}
	c->outcome = "ok"; /* the caller's close() sends the RST */
}

static void rst_client(conn_t *c, int fd)
{
	uint8_t b[4096];
	stream_t out = { SEED_C2S, 0, "request" };
	if (send_stream(c, fd, &out, RST_REQ, RST_REQ, RST_REQ, 0, 0, 0, "sending the request") < 0)
		return;
	STAGE(c, "recv after the request, the server resets", 0);
	ssize_t r = recv(fd, b, sizeof b, 0);
	if (r == 0) {
		c->outcome = "eof";
	} else if (r < 0 && errno == ECONNRESET) {
		c->outcome = "reset";
	} else if (r < 0) {
		err_sys(c, "recv", errno, "waiting for the server's RST", 0);
	} else {
		atomic_fetch_add(&g_in, (unsigned long long)r);
		add_err(c, "unexpected-data",
			"recv: returned %zd bytes; the server sends none, it resets", r);
	}
}

/* ------------------------------------------------------------------------------------------ */
/* Modes splice, splice-et, splice-client                                                      */

#define SPL_TOTAL (4u * MiB)

/* Reads the n bytes splice just put in the pipe and checks them. */
static int drain_pipe(conn_t *c, int pr, size_t n, stream_t *s)
{
	static __thread uint8_t buf[64 * KiB];
	while (n > 0) {
		size_t want = n < sizeof buf ? n : sizeof buf;
		ssize_t r = read(pr, buf, want);
		if (r < 0) {
			err_sys(c, "read(pipe)", errno, "draining the pipe", s->off);
			return -1;
		}
		if (r == 0) {
			add_err(c, "pipe-eof", "read(pipe): EOF with %zu spliced bytes still in it", n);
			return -1;
		}
		if (pat_check(c, s, buf, (size_t)r) < 0)
			return -1;
		n -= (size_t)r;
	}
	return 0;
}

static int make_pipe(conn_t *c, int p[2])
{
	if (pipe2(p, O_CLOEXEC) < 0) {
		err_sys(c, "pipe2", errno, "creating the pipe for splice", 0);
		return -1;
	}
	return 0;
}

/* Blocking splice(socket -> pipe, 64 KiB, SPLICE_F_MOVE) until EOF; exactly `total` bytes. */
static int splice_recv_blocking(conn_t *c, int fd, stream_t *s, uint64_t total)
{
	int p[2], rc = -1;
	if (make_pipe(c, p) < 0)
		return -1;
	for (;;) {
		STAGE(c, "blocking splice(socket -> pipe)", s->off);
		ssize_t n = splice(fd, NULL, p[1], NULL, 64 * KiB, SPLICE_F_MOVE);
		if (n < 0) {
			err_sys(c, "splice", errno, "blocking splice(socket -> pipe)", s->off);
			goto out;
		}
		if (n == 0)
			break;
		atomic_fetch_add(&g_in, (unsigned long long)n);
		if (drain_pipe(c, p[0], (size_t)n, s) < 0)
			goto out;
		if (s->off > total) {
			add_err(c, "extra-data", "splice: %" PRIu64 " bytes, more than the %" PRIu64 " sent",
				s->off, total);
			goto out;
		}
	}
	if (s->off != total) {
		add_err(c, "premature-eof",
			"splice: returned 0 (EOF) after %" PRIu64 " of %" PRIu64 " bytes", s->off, total);
		goto out;
	}
	rc = 0;
out:
	close(p[0]);
	close(p[1]);
	return rc;
}

static void splice_server(conn_t *c, int fd)
{
	stream_t in = { SEED_C2S, 0, "client stream" };
	if (splice_recv_blocking(c, fd, &in, SPL_TOTAL) < 0 || send_ctrl(c, fd, "done") < 0)
		return;
	c->outcome = "ok";
}

static void splice_et_server(conn_t *c, int fd)
{
	stream_t in = { SEED_C2S, 0, "client stream" };
	int p[2], ep = -1, eof = 0;
	if (make_pipe(c, p) < 0)
		return;
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		err_sys(c, "fcntl(O_NONBLOCK)", errno, "making the socket non-blocking", 0);
		goto out;
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0) {
		err_sys(c, "epoll_create1", errno, "creating the epoll instance", 0);
		goto out;
	}
	struct epoll_event ev = { .events = EPOLLIN | EPOLLET, .data.fd = fd };
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
		err_sys(c, "epoll_ctl", errno, "adding the socket (EPOLLIN|EPOLLET)", 0);
		goto out;
	}
	while (!eof) {
		STAGE(c, "epoll_wait(EPOLLIN|EPOLLET, 5 s)", in.off);
		int n = epoll_wait(ep, &ev, 1, 5000);
		if (n < 0) {
			err_sys(c, "epoll_wait", errno, "waiting for EPOLLIN", in.off);
			goto out;
		}
		if (n == 0) {
			add_err(c, "stalled",
				"epoll_wait: stalled: no EPOLLIN edge within 5 s at offset %" PRIu64
				" of %u (splice had returned EAGAIN)",
				in.off, SPL_TOTAL);
			goto out;
		}
		/* Edge-triggered: splice until EAGAIN (normal here: the socket is non-blocking). */
		for (;;) {
			STAGE(c, "non-blocking splice(socket -> pipe)", in.off);
			ssize_t s = splice(fd, NULL, p[1], NULL, 64 * KiB,
					   SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
			if (s > 0) {
				atomic_fetch_add(&g_in, (unsigned long long)s);
				if (drain_pipe(c, p[0], (size_t)s, &in) < 0)
					goto out;
				if (in.off > SPL_TOTAL) {
					add_err(c, "extra-data",
						"splice: %" PRIu64 " bytes, more than the %u sent", in.off,
						SPL_TOTAL);
					goto out;
				}
				continue;
			}
			if (s == 0) {
				eof = 1;
				break;
			}
			if (errno == EAGAIN)
				break;
			err_sys(c, "splice", errno, "non-blocking splice(socket -> pipe)", in.off);
			goto out;
		}
	}
	if (in.off != SPL_TOTAL) {
		add_err(c, "premature-eof",
			"splice: returned 0 (EOF) after %" PRIu64 " of %u bytes", in.off, SPL_TOTAL);
		goto out;
	}
	if (fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
		err_sys(c, "fcntl", errno, "making the socket blocking again", in.off);
		goto out;
	}
	if (send_ctrl(c, fd, "done") < 0)
		goto out;
	c->outcome = "ok";
out:
	if (ep >= 0)
		close(ep);
	close(p[0]);
	close(p[1]);
}

/* Client of splice and splice-et: 4 MiB in random writes (20 ms pause per MiB), EOF, "done". */
static void splice_client(conn_t *c, int fd)
{
	stream_t out = { SEED_C2S, 0, "client stream" };
	if (send_stream(c, fd, &out, SPL_TOTAL, 1, 64 * KiB, 11 + (uint64_t)c->id, 1 * MiB, 20,
			"sending 4 MiB") < 0)
		return;
	if (end_then_ctrl_eof(c, fd, out.off, "done", 4) < 0)
		return;
	c->outcome = "ok";
}

static void splice_client_server(conn_t *c, int fd)
{
	uint8_t req;
	stream_t out = { SEED_S2C, 0, "server stream" };
	if (recv_exact(c, fd, &req, 1, "reading the 1-byte request", 0) < 0)
		return;
	if (req != 'R') {
		add_err(c, "bad-request", "recv: request byte 0x%02x, expected 'R'", req);
		return;
	}
	if (send_stream(c, fd, &out, SPL_TOTAL, 1, 64 * KiB, 13 + (uint64_t)c->id, 1 * MiB, 20,
			"sending 4 MiB") < 0)
		return;
	if (end_then_ctrl_eof(c, fd, out.off, "done", 1) < 0)
		return;
	c->outcome = "ok";
}

static void splice_client_client(conn_t *c, int fd)
{
	stream_t in = { SEED_S2C, 0, "server stream" };
	if (xsend(c, fd, "R", 1, "sending the request", 0) < 0)
		return;
	if (splice_recv_blocking(c, fd, &in, SPL_TOTAL) < 0 || send_ctrl(c, fd, "done") < 0)
		return;
	c->outcome = "ok";
}

/* ------------------------------------------------------------------------------------------ */
/* Mode connect-timeout: non-blocking connect with poll(POLLOUT, 5 s), then blocking I/O.      */
/*
 * The classic C "connect with a timeout": O_NONBLOCK (fcntl), connect() -> EINPROGRESS,
 * poll(POLLOUT, 5 s), getsockopt(SO_ERROR) == 0, then O_NONBLOCK cleared again (fcntl): from then
 * on the socket is blocking, so EAGAIN (or EINTR) from it is an error. 20 rounds of a 300-byte
 * request and a 20 KiB response read with a plain recv loop, then shutdown(SHUT_WR) and EOF.
 */
#define CT_ROUNDS 20
#define CT_REQ 300u
#define CT_RESP (20u * KiB)
#define CT_CONNECT_MS 5000

static int ct_connect(conn_t *c)
{
	STAGE(c, "creating the client socket", 0);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		err_sys(c, "socket", errno, "creating the client socket", 0);
		return -1;
	}
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0) {
		err_sys(c, "fcntl(F_GETFL)", errno, "reading the file status flags", 0);
		goto fail;
	}
	if (fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		err_sys(c, "fcntl(F_SETFL)", errno, "setting O_NONBLOCK before connect", 0);
		goto fail;
	}
	STAGE(c, "non-blocking connect", 0);
	if (connect(fd, (struct sockaddr *)&g_target, sizeof g_target) == 0) {
		/* Legal (the idiom takes it as success), although TCP normally says EINPROGRESS. */
		fprintf(stderr, "conform-c client connect-timeout: conn %d: connect returned 0 at once\n",
			c->id);
	} else {
		int e = errno;
		if (e != EINPROGRESS) {
			err_sys(c, "connect", e, "non-blocking connect to the target", 0);
			goto fail;
		}
		struct pollfd p = { .fd = fd, .events = POLLOUT };
		STAGE(c, "poll(POLLOUT, 5 s) for the non-blocking connect", 0);
		int r = poll(&p, 1, CT_CONNECT_MS);
		if (r < 0) {
			err_sys(c, "poll", errno, "waiting for the non-blocking connect", 0);
			goto fail;
		}
		if (r == 0) {
			add_err(c, "stalled",
				"poll: stalled: the non-blocking connect did not complete within %d ms "
				"(poll(POLLOUT) timed out)",
				CT_CONNECT_MS);
			goto fail;
		}
		int so = 0;
		socklen_t l = sizeof so;
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &l) < 0) {
			err_sys(c, "getsockopt(SO_ERROR)", errno, "checking the non-blocking connect", 0);
			goto fail;
		}
		if (so != 0) {
			err_sys(c, "connect", so, "non-blocking connect (SO_ERROR after poll(POLLOUT))",
				0);
			goto fail;
		}
		if (!(p.revents & POLLOUT)) {
			add_err(c, "connect-poll",
				"poll: revents 0x%x without POLLOUT after the non-blocking connect, "
				"SO_ERROR 0",
				p.revents);
			goto fail;
		}
	}
	/* Blocking from now on. */
	if (fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
		err_sys(c, "fcntl(F_SETFL)", errno, "clearing O_NONBLOCK after the connect", 0);
		goto fail;
	}
	int now = fcntl(fd, F_GETFL);
	if (now < 0) {
		err_sys(c, "fcntl(F_GETFL)", errno, "re-reading the file status flags", 0);
		goto fail;
	}
	if (now & O_NONBLOCK) {
		add_err(c, "still-nonblocking",
			"fcntl(F_GETFL): O_NONBLOCK still set (flags 0x%x) after clearing it", now);
		goto fail;
	}
	return fd;
fail:
	close(fd);
	return -1;
}

static void ct_server(conn_t *c, int fd)
{
	uint8_t req[CT_REQ];
	stream_t in = { SEED_C2S, 0, "request stream" }, out = { SEED_S2C, 0, "response stream" };
	for (unsigned i = 0; i < CT_ROUNDS; i++) {
		if (recv_exact(c, fd, req, CT_REQ, "reading a 300-byte request", in.off) < 0 ||
		    pat_check(c, &in, req, CT_REQ) < 0)
			return;
		if (send_stream(c, fd, &out, CT_RESP, CT_RESP, CT_RESP, 0, 0, 0,
				"sending a 20 KiB response") < 0)
			return;
	}
	if (expect_eof(c, fd, "waiting for the client's EOF after the last response", in.off) < 0)
		return;
	c->outcome = "eof";
}

static void ct_client(conn_t *c, int fd)
{
	static __thread uint8_t buf[CT_RESP];
	stream_t out = { SEED_C2S, 0, "request stream" }, in = { SEED_S2C, 0, "response stream" };
	for (unsigned i = 0; i < CT_ROUNDS; i++) {
		if (send_stream(c, fd, &out, CT_REQ, CT_REQ, CT_REQ, 0, 0, 0,
				"blocking send of a 300-byte request") < 0)
			return;
		if (recv_exact(c, fd, buf, CT_RESP, "blocking recv loop for a 20 KiB response",
			       in.off) < 0 ||
		    pat_check(c, &in, buf, CT_RESP) < 0)
			return;
	}
	if (shut_wr(c, fd, "half-closing after the last request", out.off) < 0)
		return;
	if (expect_eof(c, fd, "blocking recv expecting EOF after shutdown(SHUT_WR)", in.off) < 0)
		return;
	c->outcome = "eof";
}

/* ------------------------------------------------------------------------------------------ */
/* Modes tfo / tfo-nb: TCP Fast Open client (TCP_FASTOPEN_CONNECT), no cookie to begin with.  */
/*
 * The client sets TCP_FASTOPEN_CONNECT, connects and writes at once: 1000 bytes, then 1 MiB in
 * 16 KiB writes, then reads "done". Without a cached cookie connect() sends a SYN with a cookie
 * request (blocking: returns once connected; non-blocking: EINPROGRESS); with one (only if the
 * server side of net.ipv4.tcp_fastopen is on) connect() returns 0 at once and the first write
 * sends SYN + data. tfo blocks; tfo-nb is non-blocking from socket() on and waits for EAGAIN with
 * poll (a write before the handshake completed may also say EINPROGRESS: waited for the same
 * way). The server (TCP_FASTOPEN 16 on the listener) checks all 1000 + 1 MiB bytes in order.
 */
#ifndef TCP_FASTOPEN_CONNECT
#define TCP_FASTOPEN_CONNECT 30 /* Linux >= 4.11 */
#endif
#define TFO_FIRST 1000u
#define TFO_BULK (1u * MiB)
#define TFO_CHUNK (16u * KiB)
#define TFO_QLEN 16
#define NB_WAIT_MS 5000

static int tfo_listener(int ls)
{
	int q = TFO_QLEN;
	if (setsockopt(ls, IPPROTO_TCP, TCP_FASTOPEN, &q, sizeof q) < 0) {
		err_sys(NULL, "setsockopt(TCP_FASTOPEN)", errno, "enabling Fast Open on the listener",
			0);
		return -1;
	}
	return 0;
}

/* What the connection's SYN exchange was, on stderr (diagnostics: not part of the outcome). */
static void tfo_note(conn_t *c, int fd, const char *extra)
{
	struct tcp_info ti;
	socklen_t l = sizeof ti;
	memset(&ti, 0, sizeof ti);
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &l) < 0) {
		fprintf(stderr, "conform-c %s %s: conn %d: getsockopt(TCP_INFO): %s\n", g_side,
			g_mode_name, c->id, ename(errno));
		return;
	}
	fprintf(stderr, "conform-c %s %s: conn %d: %sdata in SYN acked (TCPI_OPT_SYN_DATA): %s\n",
		g_side, g_mode_name, c->id, extra,
		(ti.tcpi_options & TCPI_OPT_SYN_DATA) ? "yes" : "no");
}

static void tfo_server(conn_t *c, int fd)
{
	static __thread uint8_t buf[64 * KiB];
	stream_t in = { SEED_C2S, 0, "client stream" };
	const uint64_t total = TFO_FIRST + TFO_BULK;
	while (in.off < total) {
		size_t want = total - in.off < sizeof buf ? (size_t)(total - in.off) : sizeof buf;
		ssize_t r = xrecv(c, fd, buf, want, 0, "reading the 1000 B + 1 MiB stream", in.off);
		if (r < 0)
			return;
		if (r == 0) {
			add_err(c, "premature-eof",
				"recv: EOF after %" PRIu64 " of %" PRIu64 " bytes", in.off, total);
			return;
		}
		if (pat_check(c, &in, buf, (size_t)r) < 0)
			return;
	}
	tfo_note(c, fd, "");
	if (send_ctrl(c, fd, "done") < 0 ||
	    expect_eof(c, fd, "waiting for the client's close after done", in.off) < 0)
		return;
	c->outcome = "ok";
}

static int tfo_socket(conn_t *c, int nonblock, const char **how)
{
	STAGE(c, "creating the client socket", 0);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
	if (fd < 0) {
		err_sys(c, "socket", errno, "creating the client socket", 0);
		return -1;
	}
	int one = 1;
	if (setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN_CONNECT, &one, sizeof one) < 0) {
		err_sys(c, "setsockopt(TCP_FASTOPEN_CONNECT)", errno,
			"enabling Fast Open on connect (needs Linux >= 4.11 and the client bit of "
			"net.ipv4.tcp_fastopen)",
			0);
		close(fd);
		return -1;
	}
	STAGE(c, "connect with TCP_FASTOPEN_CONNECT", 0);
	if (connect(fd, (struct sockaddr *)&g_target, sizeof g_target) == 0) {
		*how = "connect returned 0; ";
		return fd;
	}
	int e = errno;
	if (nonblock && e == EINPROGRESS) { /* no cookie: SYN with a cookie request sent */
		*how = "connect returned EINPROGRESS; ";
		return fd;
	}
	err_sys(c, "connect", e, "connecting with TCP_FASTOPEN_CONNECT", 0);
	close(fd);
	return -1;
}

static __thread const char *tfo_how = "";
static int tfo_connect(conn_t *c) { return tfo_socket(c, 0, &tfo_how); }
static int tfo_nb_connect(conn_t *c) { return tfo_socket(c, 1, &tfo_how); }

/* tfo-nb: after EAGAIN, poll(events, 5 s); 0 when the socket is ready, -1 on error or timeout. */
static int nb_wait(conn_t *c, int fd, short events, const char *what, uint64_t off)
{
	struct pollfd p = { .fd = fd, .events = events };
	STAGE(c, what, off);
	int r = poll(&p, 1, NB_WAIT_MS);
	if (r < 0) {
		err_sys(c, "poll", errno, what, off);
		return -1;
	}
	if (r == 0) {
		add_err(c, "stalled",
			"poll: stalled: not %s within %d ms while %s at offset %" PRIu64,
			events & POLLOUT ? "writable" : "readable", NB_WAIT_MS, what, off);
		return -1;
	}
	if (p.revents & POLLNVAL) {
		add_err(c, "poll-nval", "poll: POLLNVAL while %s at offset %" PRIu64, what, off);
		return -1;
	}
	return 0;
}

struct nb_counts {
	unsigned long w_eagain, w_einprogress, r_eagain;
};

/* tfo-nb: sends all of buf on the non-blocking socket; EAGAIN/EINPROGRESS wait for POLLOUT. */
static int nb_send_all(conn_t *c, int fd, const void *buf, size_t len, const char *what,
		       uint64_t off, struct nb_counts *n)
{
	size_t done = 0;
	while (done < len) {
		STAGE(c, what, off + done);
		ssize_t r = send(fd, (const uint8_t *)buf + done, len - done, MSG_NOSIGNAL);
		if (r > 0) {
			done += (size_t)r;
			atomic_fetch_add(&g_out, (unsigned long long)r);
			continue;
		}
		int e = r == 0 ? EIO : errno;
		if (r < 0 && (e == EAGAIN || e == EWOULDBLOCK || e == EINPROGRESS)) {
			if (e == EINPROGRESS)
				n->w_einprogress++;
			else
				n->w_eagain++;
			if (nb_wait(c, fd, POLLOUT, what, off + done) < 0)
				return -1;
			continue;
		}
		err_sys(c, "send", e, what, off + done);
		return -1;
	}
	return 0;
}

/* tfo-nb: receives exactly len bytes on the non-blocking socket; EAGAIN waits for POLLIN. */
static int nb_recv_exact(conn_t *c, int fd, void *buf, size_t len, const char *what,
			 struct nb_counts *n)
{
	size_t got = 0;
	while (got < len) {
		STAGE(c, what, got);
		ssize_t r = recv(fd, (uint8_t *)buf + got, len - got, 0);
		if (r > 0) {
			got += (size_t)r;
			atomic_fetch_add(&g_in, (unsigned long long)r);
			continue;
		}
		if (r == 0) {
			add_err(c, "premature-eof", "recv: EOF after %zu of %zu bytes while %s", got,
				len, what);
			return -1;
		}
		int e = errno;
		if (e == EAGAIN || e == EWOULDBLOCK) {
			n->r_eagain++;
			if (nb_wait(c, fd, POLLIN, what, got) < 0)
				return -1;
			continue;
		}
		err_sys(c, "recv", e, what, got);
		return -1;
	}
	return 0;
}

/* Both clients: 1000 bytes right after connect, 1 MiB in 16 KiB writes, then "done". */
static void tfo_run(conn_t *c, int fd, int nonblock)
{
	static __thread uint8_t buf[TFO_CHUNK];
	struct nb_counts n = { 0, 0, 0 };
	stream_t out = { SEED_C2S, 0, "client stream" };
	const uint64_t total = TFO_FIRST + TFO_BULK;
	while (out.off < total) {
		uint64_t off = out.off;
		size_t len = off < TFO_FIRST	       ? TFO_FIRST - (size_t)off
			     : total - off < TFO_CHUNK ? (size_t)(total - off)
						       : TFO_CHUNK;
		const char *what = off < TFO_FIRST ? "writing 1000 bytes right after connect"
						   : "writing 1 MiB in 16 KiB writes";
		pat_fill(&out, buf, len);
		if (nonblock ? nb_send_all(c, fd, buf, len, what, off, &n) < 0
			     : xsend(c, fd, buf, len, what, off) < 0)
			return;
	}
	uint8_t rep[4];
	if (nonblock) {
		if (nb_recv_exact(c, fd, rep, 4, "recv + poll(POLLIN) of the reply", &n) < 0)
			return;
	} else {
		ssize_t r = xrecv(c, fd, rep, 4, MSG_WAITALL, "recv(4, MSG_WAITALL) of the reply", 0);
		if (r < 0)
			return;
		if (r != 4) {
			add_err(c, r == 0 ? "premature-eof" : "waitall-short",
				"recv(MSG_WAITALL): returned %zd bytes, expected the 4-byte reply "
				"\"done\"",
				r);
			return;
		}
	}
	if (memcmp(rep, "done", 4) != 0) {
		add_err(c, "bad-reply", "recv: reply \"%.4s\", expected \"done\"", (const char *)rep);
		return;
	}
	char note[160];
	if (nonblock)
		snprintf(note, sizeof note,
			 "%swrites waited %lu x EAGAIN + %lu x EINPROGRESS, reads %lu x EAGAIN; ",
			 tfo_how, n.w_eagain, n.w_einprogress, n.r_eagain);
	else
		snprintf(note, sizeof note, "%s", tfo_how);
	tfo_note(c, fd, note);
	c->outcome = "ok";
}

static void tfo_client(conn_t *c, int fd) { tfo_run(c, fd, 0); }
static void tfo_nb_client(conn_t *c, int fd) { tfo_run(c, fd, 1); }

/* ------------------------------------------------------------------------------------------ */
/* Mode table                                                                                  */

static const mode_t_ MODES[] = {
	{ "threads", threads_server, threads_client, 1, 1, SIGM_NONE, "ok", NULL, NULL },
	{ "signal-restart", sig_server, sig_client, 0, 0, SIGM_RESTART, "ok", NULL, NULL },
	{ "signal-eintr", sig_server, sig_client, 0, 0, SIGM_EINTR, "ok", NULL, NULL },
	{ "waitall", waitall_server, waitall_client, 1, 0, SIGM_NONE, "ok", NULL, NULL },
	{ "rcvlowat", rcvlowat_server, rcvlowat_client, 1, 0, SIGM_NONE, "ok", NULL, NULL },
	{ "peek", peek_server, peek_client, 1, 0, SIGM_NONE, "ok", NULL, NULL },
	{ "rcvtimeo", rcvtimeo_server, rcvtimeo_client, 1, 0, SIGM_NONE, NULL, NULL, NULL },
	{ "fionread", fionread_server, fionread_client, 1, 0, SIGM_NONE, "ok", NULL, NULL },
	{ "halfclose", halfclose_server, halfclose_client, 1, 0, SIGM_NONE, "eof", NULL, NULL },
	{ "rst", rst_server, rst_client, 1, 0, SIGM_NONE, NULL, NULL, NULL },
	{ "splice", splice_server, splice_client, 1, 0, SIGM_NONE, "ok", NULL, NULL },
	{ "splice-et", splice_et_server, splice_client, 1, 0, SIGM_NONE, "ok", NULL, NULL },
	{ "splice-client", splice_client_server, splice_client_client, 1, 0, SIGM_NONE, "ok", NULL,
	  NULL },
	{ "connect-timeout", ct_server, ct_client, 1, 0, SIGM_NONE, "eof", ct_connect, NULL },
	{ "tfo", tfo_server, tfo_client, 1, 0, SIGM_NONE, "ok", tfo_connect, tfo_listener },
	{ "tfo-nb", tfo_server, tfo_nb_client, 1, 0, SIGM_NONE, "ok", tfo_nb_connect,
	  tfo_listener },
};

/* The outcome a correct connection of this mode on this side reports. */
static int outcome_expected(const char *o)
{
	if (!o)
		return 0;
	if (!strcmp(g_mode->name, "rst"))
		return g_is_server ? !strcmp(o, "ok") : (!strcmp(o, "eof") || !strcmp(o, "reset"));
	if (!strcmp(g_mode->name, "rcvtimeo"))
		return !strcmp(o, g_is_server ? "ok" : "timeout-then-data");
	return !strcmp(o, g_mode->expect);
}

/* ------------------------------------------------------------------------------------------ */
/* Final report                                                                                */

static void json_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch < 0x20)
			fprintf(f, "\\u%04x", ch);
		else
			fputc(ch, f);
	}
	fputc('"', f);
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Prints the final JSON line and exits. Called once: by main, or by the watchdog. */
static void finish(int stalled) __attribute__((noreturn));
static void finish(int stalled)
{
	static char outs[4096];
	if (g_mode && g_mode->sig != SIGM_NONE)
		timer_stop();
	pthread_mutex_lock(&g_lock);
	if (g_printed) { /* the other caller got here first and exits */
		pthread_mutex_unlock(&g_lock);
		for (;;)
			pause();
	}
	g_printed = 1;

	/* Per-connection outcome: what it observed, or fail:<class of its first error>. */
	const char **list = calloc((size_t)g_conns + 1, sizeof *list);
	char **owned = calloc((size_t)g_conns + 1, sizeof *owned);
	int nl = 0, all_expected = 1;
	for (int i = 0; g_c && i < g_conns; i++) {
		conn_t *c = &g_c[i];
		if (atomic_load(&c->nerr) > 0) {
			size_t len = strlen(c->fail) + 6;
			owned[i] = malloc(len);
			snprintf(owned[i], len, "fail:%s", c->fail[0] ? c->fail : "error");
			list[nl++] = owned[i];
			all_expected = 0;
		} else if (!atomic_load(&c->finished) || !c->outcome) {
			list[nl++] = stalled ? "stalled" : "incomplete";
			all_expected = 0;
		} else {
			list[nl++] = c->outcome;
			if (!outcome_expected(c->outcome))
				all_expected = 0;
		}
	}
	qsort(list, (size_t)nl, sizeof *list, cmp_str);
	outs[0] = 0;
	for (int i = 0; i < nl; i++) {
		if (i > 0 && !strcmp(list[i], list[i - 1]))
			continue;
		if (outs[0])
			strncat(outs, "+", sizeof outs - strlen(outs) - 1);
		strncat(outs, list[i], sizeof outs - strlen(outs) - 1);
	}
	if (!nl)
		snprintf(outs, sizeof outs, "%s", stalled ? "stalled" : "none");

	if (g_mode && g_mode->sig != SIGM_NONE && atomic_load(&g_sigalrm) == 0 && !stalled) {
		pthread_mutex_unlock(&g_lock);
		add_err(NULL, "no-signal", "setitimer: no SIGALRM was delivered during the run");
		pthread_mutex_lock(&g_lock);
	}
	int ok = g_nerrs == 0 && g_errs_dropped == 0 && all_expected && !stalled;
	if (g_mode && g_mode->sig != SIGM_NONE)
		fprintf(stderr, "conform-c %s %s: %lu SIGALRM delivered, %lu EINTR retried\n", g_side,
			g_mode_name, atomic_load(&g_sigalrm), atomic_load(&g_eintr));

	FILE *f = stdout;
	fprintf(f, "{\"ok\": %s, \"mode\": ", ok ? "true" : "false");
	json_str(f, g_mode_name);
	fprintf(f, ", \"side\": ");
	json_str(f, g_side);
	fprintf(f, ", \"bytes_in\": %llu, \"bytes_out\": %llu, \"outcome\": ", atomic_load(&g_in),
		atomic_load(&g_out));
	json_str(f, outs);
	fprintf(f, ", \"errors\": [");
	for (int i = 0; i < g_nerrs; i++) {
		if (i)
			fprintf(f, ", ");
		json_str(f, g_errs[i]);
	}
	if (g_errs_dropped)
		fprintf(f, "%s\"... and %d more errors\"", g_nerrs ? ", " : "", g_errs_dropped);
	fprintf(f, "]}\n");
	fflush(f);
	_exit(ok ? 0 : 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Watchdog: a hang (the kind of bug this suite hunts) still ends with a JSON line.            */

static void *watchdog(void *arg)
{
	(void)arg;
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	t.tv_sec += (time_t)g_deadline;
	t.tv_nsec += (long)((g_deadline - (double)(time_t)g_deadline) * 1e9);
	if (t.tv_nsec >= 1000000000L) {
		t.tv_sec++;
		t.tv_nsec -= 1000000000L;
	}
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR)
		;
	char where[1500];
	size_t w = 0;
	where[0] = 0;
	w += (size_t)snprintf(where + w, sizeof where - w, "main: %s",
			      atomic_load(&g_main_stage));
	for (int i = 0; i < g_conns && w < sizeof where - 1; i++) {
		conn_t *c = &g_c[i];
		if (atomic_load(&c->finished))
			continue;
		const char *s = atomic_load(&c->stage);
		w += (size_t)snprintf(where + w, sizeof where - w, "; conn %d: %s at offset %" PRIu64,
				      i, s ? s : "not started", atomic_load(&c->stage_off));
	}
	add_err(NULL, "stalled", "watchdog: not finished after %g s (%s)", g_deadline, where);
	finish(1);
}

/* ------------------------------------------------------------------------------------------ */
/* Server and client frameworks                                                                */

struct conn_arg {
	conn_t *c;
	int fd;
};

static void serve_one(conn_t *c, int fd)
{
	g_mode->server(c, fd);
	close(fd); /* in mode rst, with SO_LINGER {1, 0}: the RST */
	atomic_store(&c->finished, 1);
}

static void *serve_thread(void *p)
{
	struct conn_arg *a = p;
	serve_one(a->c, a->fd);
	free(a);
	return NULL;
}

static void run_server(void)
{
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0) {
		err_sys(NULL, "socket", errno, "creating the listener", 0);
		return;
	}
	int one = 1;
	if (setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
		err_sys(NULL, "setsockopt(SO_REUSEADDR)", errno, "creating the listener", 0);
		return;
	}
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)g_port),
				 .sin_addr.s_addr = htonl(INADDR_ANY) };
	if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) {
		err_sys(NULL, "bind", errno, "binding 0.0.0.0", (uint64_t)g_port);
		return;
	}
	if (g_mode->listener && g_mode->listener(ls) < 0)
		return;
	if (listen(ls, 128) < 0) {
		err_sys(NULL, "listen", errno, "listening", 0);
		return;
	}
	printf("ready\n");
	fflush(stdout);
	if (g_mode->sig != SIGM_NONE)
		timer_start();

	pthread_t *th = calloc((size_t)g_conns, sizeof *th);
	int nth = 0;
	for (int k = 0; k < g_conns; k++) {
		atomic_store(&g_main_stage, "accepting connections");
		int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			int e = errno;
			if (e == EINTR && eintr_retry()) {
				k--;
				continue;
			}
			err_sys(NULL, "accept4", e, "accepting a connection", (uint64_t)k);
			break;
		}
		if (!g_mode->server_concurrent) {
			atomic_store(&g_main_stage, "serving a connection");
			serve_one(&g_c[k], fd);
			continue;
		}
		struct conn_arg *arg = malloc(sizeof *arg);
		arg->c = &g_c[k];
		arg->fd = fd;
		int e = pthread_create(&th[nth], NULL, serve_thread, arg);
		if (e) {
			err_sys(&g_c[k], "pthread_create", e, "starting a connection thread", 0);
			close(fd);
			free(arg);
			continue;
		}
		nth++;
	}
	close(ls);
	atomic_store(&g_main_stage, "waiting for connection threads");
	for (int i = 0; i < nth; i++)
		pthread_join(th[i], NULL);
	free(th);
}

/* connect(); in signal-eintr an interrupted connect completes in the background: poll for it
 * and read SO_ERROR, as POSIX asks an application to. */
static int client_connect(conn_t *c)
{
	STAGE(c, "connecting", 0);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		err_sys(c, "socket", errno, "creating the client socket", 0);
		return -1;
	}
	if (connect(fd, (struct sockaddr *)&g_target, sizeof g_target) == 0)
		return fd;
	int e = errno;
	if (e == EINTR && eintr_retry()) {
		struct pollfd p = { .fd = fd, .events = POLLOUT };
		int r;
		while ((r = poll(&p, 1, -1)) < 0 && errno == EINTR && eintr_retry())
			;
		if (r < 0) {
			err_sys(c, "poll", errno, "waiting for an interrupted connect", 0);
			close(fd);
			return -1;
		}
		socklen_t l = sizeof e;
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &l) < 0)
			e = errno;
		if (e == 0)
			return fd;
	}
	err_sys(c, "connect", e, "connecting to the target", 0);
	close(fd);
	return -1;
}

static void client_one(conn_t *c)
{
	int fd = g_mode->connect ? g_mode->connect(c) : client_connect(c);
	if (fd >= 0) {
		g_mode->client(c, fd);
		close(fd);
	}
	atomic_store(&c->finished, 1);
}

static void *client_thread(void *p)
{
	client_one(p);
	return NULL;
}

static void run_client(void)
{
	if (g_mode->sig != SIGM_NONE)
		timer_start();
	if (!g_mode->client_concurrent) {
		atomic_store(&g_main_stage, "running connections one after the other");
		for (int k = 0; k < g_conns; k++)
			client_one(&g_c[k]);
		return;
	}
	atomic_store(&g_main_stage, "waiting for concurrent connections");
	pthread_t *th = calloc((size_t)g_conns, sizeof *th);
	int *started = calloc((size_t)g_conns, sizeof *started);
	for (int k = 0; k < g_conns; k++) {
		int e = pthread_create(&th[k], NULL, client_thread, &g_c[k]);
		if (e)
			err_sys(&g_c[k], "pthread_create", e, "starting a connection thread", 0);
		else
			started[k] = 1;
	}
	for (int k = 0; k < g_conns; k++)
		if (started[k])
			pthread_join(th[k], NULL);
	free(th);
	free(started);
}

/* ------------------------------------------------------------------------------------------ */

static void usage(void) __attribute__((noreturn));
static void usage(void)
{
	fprintf(stderr, "usage: conform-c server MODE --port P --conns N [--deadline SECONDS]\n"
			"       conform-c client MODE --target IP:PORT --conns N [--deadline SECONDS]\n"
			"modes:");
	for (size_t i = 0; i < sizeof MODES / sizeof MODES[0]; i++)
		fprintf(stderr, " %s", MODES[i].name);
	fprintf(stderr, "\n--deadline: the watchdog reports ok:false after that long (default 20; "
			"0: none)\n");
	exit(2);
}

static long parse_num(const char *s, long lo, long hi)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		usage();
	return v;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		usage();
	if (!strcmp(argv[1], "server"))
		g_is_server = 1;
	else if (strcmp(argv[1], "client"))
		usage();
	g_side = g_is_server ? "server" : "client";
	for (size_t i = 0; i < sizeof MODES / sizeof MODES[0]; i++)
		if (!strcmp(argv[2], MODES[i].name))
			g_mode = &MODES[i];
	if (!g_mode)
		usage();
	g_mode_name = g_mode->name;
	int have_target = 0;
	for (int i = 3; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--port")) {
			g_port = (int)parse_num(argv[++i], 1, 65535);
		} else if (!strcmp(argv[i], "--conns")) {
			g_conns = (int)parse_num(argv[++i], 1, 10000);
		} else if (!strcmp(argv[i], "--deadline")) {
			char *end;
			g_deadline = strtod(argv[++i], &end);
			if (*end || g_deadline < 0)
				usage();
		} else if (!strcmp(argv[i], "--target")) {
			char host[64];
			const char *t = argv[++i], *colon = strrchr(t, ':');
			if (!colon || (size_t)(colon - t) >= sizeof host)
				usage();
			memcpy(host, t, (size_t)(colon - t));
			host[colon - t] = 0;
			g_target.sin_family = AF_INET;
			g_target.sin_port = htons((uint16_t)parse_num(colon + 1, 1, 65535));
			if (inet_pton(AF_INET, host, &g_target.sin_addr) != 1)
				usage();
			have_target = 1;
		} else {
			usage();
		}
	}
	if (g_is_server ? g_port < 0 : !have_target)
		usage();

	pat_init();
	signal(SIGPIPE, SIG_IGN);
	g_c = calloc((size_t)g_conns, sizeof *g_c);
	for (int i = 0; i < g_conns; i++)
		g_c[i].id = i;

	if (g_deadline > 0) {
		/* The watchdog never takes SIGALRM: the signal modes' signals go to the I/O thread. */
		sigset_t all, old;
		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
		pthread_t wd;
		int e = pthread_create(&wd, NULL, watchdog, NULL);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		if (e)
			err_sys(NULL, "pthread_create", e, "starting the watchdog", 0);
	}
	if (g_is_server)
		run_server();
	else
		run_client();
	atomic_store(&g_main_stage, "done");
	finish(0);
}
