//! Programs run inside the local mesh's pods: an Envoy stand-in relay, a checksumming
//! sink/sender pair, an echo server with a ping-pong latency client, a minimal HTTP/1.1 server
//! with a verifying keep-alive load generator, the benchmarks' A/B clients and the soak pair.
//! Each lives in `meshaccel_e2e::tool`; this binary parses the command line and calls it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshaccel_e2e::tool::{
    self, ab, echo, http_load, http_server, istio_iptables, obj_get, relay, relay_ds, scale, sink,
    soak, unix_rr,
};

/// Test programs for meshaccel's local mesh.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tries to open a pinned BPF object (BPF_OBJ_GET) as whoever runs it; prints
    /// `{"ok":true}` or `{"ok":false,"errno":N,"error":"…"}` and exits 0 either way.
    ObjGet(obj_get::ObjGetArgs),
    /// Stand-in for Envoy in a pod with Istio's iptables rules (run it as uid 1337): relays each
    /// connection redirected to the outbound port to its original destination, and each one
    /// redirected to the inbound port to its original destination from <inbound-bind>:0.
    Relay(relay::RelayArgs),
    /// Accepts connections forever; reads each to EOF, then answers `bytes=<n> crc=<hex>`.
    Sink(sink::SinkArgs),
    /// Many `send`s at once: `connections` connections, `concurrency` at a time, each writing
    /// right after connect() returns; seeds differ per connection. One JSON line; exit 0 only if
    /// every sink answer matched.
    Swarm(sink::SwarmArgs),
    /// Sends N deterministic pseudo-random bytes to a sink and checks its answer; prints one JSON
    /// line and exits 0 only if the sink saw exactly what was sent.
    Send(sink::SendArgs),
    /// Echoes every connection's bytes back until EOF.
    Echo(echo::EchoArgs),
    /// Sends `size` bytes, waits for them to come back, `count` times; prints JSON latencies.
    Pingpong(echo::PingpongArgs),
    /// Minimal HTTP/1.1 server (keep-alive, a thread per connection): `GET /bytes/<n>` answers n
    /// deterministic bytes, `POST /echo` the request body, both with `x-crc32: <hex crc32 of the
    /// body>`; anything else is 404.
    HttpServer(http_server::HttpServerArgs),
    /// HTTP/1.1 load over persistent connections, verifying every response (status 200, length,
    /// x-crc32 and the expected crc32); reconnects after connection errors. Prints one JSON line
    /// and exits 0 only if every request succeeded.
    HttpLoad(http_load::HttpLoadArgs),
    /// Request/response server for the benchmarks: each request (a 32-byte head, then padding)
    /// names the response size and write size (see `meshaccel_e2e::tool::ab`).
    RrServer(ab::RrServerArgs),
    /// A/B-interleaved rr load for the benchmarks: baseline connections opened before
    /// `--gate-file` appears, accelerated ones after, alternating blocks; one JSON line.
    AbRr(ab::AbRrArgs),
    /// A/B-interleaved HTTP/1.1 keep-alive load (`GET /bytes/<size>`, every response checked)
    /// for the benchmarks; see `ab-rr`.
    AbHttp(ab::AbHttpArgs),
    /// `relay` for IPv4 and IPv6 (a dual-stack Envoy): listens on 0.0.0.0 and [::] (v6-only),
    /// or on [::] alone accepting IPv4 as v4-mapped with `--mapped`; the original destination
    /// from SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST; inbound passthrough from 127.0.0.6 or ::6.
    RelayDs(relay_ds::RelayDsArgs),
    /// Soak server: per connection a 32-byte head (magic, flags, stall, reply size and seed),
    /// then data to EOF (stalling reads once when asked: a slow reader), then answers
    /// `bytes=<n> crc=<hex>\n` and the reply bytes. See `soak`.
    SoakServer(soak::SoakServerArgs),
    /// Soak client: opens every connection first (all concurrent), then per connection sends
    /// messages of 1 B to `--max-msg` with random pauses, half-closes and verifies the answer and
    /// the reply stream; some connections stall their reader, some end with a RST. One JSON line;
    /// exit 0 only if every connection ended within the deadline with every byte exact.
    Soak(soak::SoakArgs),
    /// The hop's floor: the same ping-pong over a UNIX stream socket pair in one process (no
    /// TCP/IP, no sockmap); one JSON line of latency percentiles.
    UnixRr(unix_rr::UnixRrArgs),
    /// Istio's init container command, for the cluster tests' pods: istio-iptables' arguments
    /// in, the pod's capture rules applied with iptables-restore.
    IstioIptables(istio_iptables::IstioIptablesArgs),
    /// The scale benchmark's server: holds any number of connections in one epoll loop and
    /// echoes what each sends (see `meshaccel_e2e::tool::scale`).
    ScaleServer(scale::ScaleServerArgs),
    /// The scale benchmark's client: holds a growing number of idle connections and measures
    /// round trips and connect-to-first-byte on request (commands on stdin, JSON lines out).
    ScaleClient(scale::ScaleClientArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::ObjGet(args) => tool::exit(obj_get::run(&args)),
        Cmd::Relay(args) => tool::exit(relay::run(&args)),
        Cmd::Sink(args) => tool::exit(sink::sink(&args)),
        Cmd::Swarm(args) => sink::swarm(&args),
        Cmd::Echo(args) => tool::exit(echo::echo(&args)),
        Cmd::Send(args) => sink::send(&args),
        Cmd::Pingpong(args) => tool::exit(echo::pingpong(&args)),
        Cmd::HttpServer(args) => tool::exit(http_server::run(&args)),
        Cmd::HttpLoad(args) => http_load::run(args),
        Cmd::RrServer(args) => tool::exit(ab::rr_server(&args)),
        Cmd::AbRr(args) => tool::ab_exit(ab::ab_rr(&args)),
        Cmd::AbHttp(args) => tool::ab_exit(ab::ab_http(&args)),
        Cmd::RelayDs(args) => tool::exit(relay_ds::run(&args)),
        Cmd::SoakServer(args) => tool::exit(soak::server(&args)),
        Cmd::UnixRr(args) => tool::exit(unix_rr::run(&args)),
        Cmd::Soak(args) => soak::run(&args),
        Cmd::IstioIptables(args) => tool::exit(istio_iptables::run(&args)),
        Cmd::ScaleServer(args) => tool::exit(scale::server(&args)),
        Cmd::ScaleClient(args) => tool::exit(scale::client(&args)),
    }
}
