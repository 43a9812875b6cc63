//! Errors of the meshaccel library: each names the input or kernel object it is about.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read workloads file {path}: {source}")]
    ReadWorkloads {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workloads file {path}: {message}")]
    InvalidWorkloads { path: PathBuf, message: String },
    #[error(
        "workload {entry}: network namespace {netns}: {message} (fix the `netns` path or remove the entry)"
    )]
    Netns {
        entry: String,
        netns: PathBuf,
        message: String,
    },
    #[error("bpffs {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error("cgroup {path}: {message}")]
    Cgroup { path: PathBuf, message: String },
    #[error("loading the eBPF programs: {message}")]
    Load { message: String },
    #[error(
        "the pinned maps under {path} are not this version's to read: {message}. Run `meshaccel uninstall --bpffs {path}` (live connections continue on TCP), then start the agent again"
    )]
    Layout { path: PathBuf, message: String },
    #[error("map {name}: {op}: {source}")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "nothing of meshaccel is pinned under {path}: start `meshaccel agent --bpffs {path}` first"
    )]
    NotInstalled { path: PathBuf },
    #[error(
        "meshaccel was uninstalled on this node for install generation {generation} ({record}): an agent of that installation does not install it again. To install again, start the agent with another --install-generation (the Helm chart sets a new one at every install and upgrade), or remove the record: rmdir {record}"
    )]
    Uninstalled { record: PathBuf, generation: String },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("serving /metrics, /healthz and /readyz on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
