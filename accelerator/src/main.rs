//! The `meshaccel` command: agent, status, doctor, uninstall.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use meshaccel::{agent, cgroup, dataplane, doctor, http, sources::Source, state_files, status};

/// meshaccel: sidecar-bypass acceleration for Istio on one node (sock_ops + sk_msg).
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "MESHACCEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `meshaccel=debug`.
    #[arg(long, global = true, env = "MESHACCEL_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
// Parsed once at start: the size of the agent variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Load and attach the programs (or adopt the pinned ones) and keep the maps equal to the
    /// workloads file. Stopping the agent leaves acceleration in place.
    Agent {
        /// cgroup v2 folder to attach sock_ops to (default: the cgroup v2 root from /proc/mounts).
        #[arg(long, env = "MESHACCEL_CGROUP")]
        cgroup: Option<PathBuf>,
        /// bpffs folder for meshaccel's pins (a bpffs is mounted there if none).
        #[arg(long, env = "MESHACCEL_BPFFS", default_value = "/sys/fs/bpf/meshaccel")]
        bpffs: PathBuf,
        /// Static workloads file (YAML); re-read when it changes and on SIGHUP.
        #[arg(long, env = "MESHACCEL_WORKLOADS")]
        workloads: Option<PathBuf>,
        /// How often to check the workloads file for changes, in milliseconds.
        #[arg(long, env = "MESHACCEL_POLL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
        poll_ms: u64,
        /// How often to re-resolve and re-apply the whole state, in seconds.
        #[arg(long, env = "MESHACCEL_RESYNC_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        resync_secs: u64,
        /// Sockets the sockhash can hold when the agent creates it (two per accelerated
        /// connection); when it is full, new connections stay on TCP. Pinned maps keep theirs.
        #[arg(long, env = "MESHACCEL_SOCKHASH_CAPACITY", value_parser = clap::value_parser!(u32).range(2..=16_777_216))]
        sockhash_capacity: Option<u32>,
        /// Replace the pinned programs with this binary's even if they look the same (an upgrade
        /// always replaces them; pinned maps and every socket's state stay).
        #[arg(long, env = "MESHACCEL_REPLACE_PROGRAMS")]
        replace_programs: bool,
        /// The installation this agent belongs to. `meshaccel uninstall` records the installed
        /// generation as uninstalled on the node; an agent of that generation (a restart by its
        /// supervisor) then never installs again. A new install uses a new generation (the Helm
        /// chart renders one per install and upgrade).
        #[arg(long, env = "MESHACCEL_INSTALL_GENERATION", default_value = meshaccel::install_gate::DEFAULT_GENERATION, value_parser = meshaccel::install_gate::check_generation)]
        install_generation: String,
        /// Bytes a receiving socket may hold unread before its sender moves to TCP until the
        /// reader has caught up (the kernel bounds no sk_msg ingress queue: without a limit a
        /// stalled reader lets its sender fill the host's TCP memory). 0: no limit.
        #[arg(long, env = "MESHACCEL_MAX_UNREAD_BYTES", default_value_t = meshaccel_common::tuning::QUEUE_LIMIT)]
        max_unread_bytes: u32,
        /// TCP keepalive idle time (seconds) for accelerated sockets that have none of their own.
        /// Their bytes bypass TCP, and the kernel drops a RST that reaches a busy socket holding
        /// more unread than its backlog limit (it is never retransmitted): the keepalive probe
        /// draws a new one, so a connection whose peer is gone ends. 0: none.
        #[arg(long, env = "MESHACCEL_KEEPALIVE_SECS", default_value_t = meshaccel_common::tuning::KEEPALIVE_SECS, value_parser = clap::value_parser!(u32).range(0..=86_400))]
        keepalive_secs: u32,
        /// How long (seconds) a service keeps new connections on plain TCP after one of its
        /// connections streamed small writes (under 1 KiB) faster than its reader read them: the
        /// kernel's redirect moves such a stream one message at a time, TCP coalesces it and
        /// moves more bytes. The connection that showed it goes on redirecting. 0: never.
        #[arg(long, env = "MESHACCEL_SMALL_WRITE_SECS", default_value_t = meshaccel_common::tuning::SMALL_WRITE_SECS, value_parser = clap::value_parser!(u32).range(0..=86_400))]
        small_write_secs: u32,
        /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 0.0.0.0:9880
        /// (port 0 picks a free port; the state file records it). Off when not given.
        #[arg(long, env = "MESHACCEL_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Run folder for the agent's state file (workload names for `status`; not a bpffs).
        #[arg(long, env = "MESHACCEL_STATE_DIR", default_value = state_files::DEFAULT_DIR)]
        state_dir: PathBuf,
        /// This node's name: accelerate the mesh pods Kubernetes schedules here (pods watched with
        /// `spec.nodeName=NAME`; namespaces opt in with the label `meshaccel.io/enabled=true`).
        /// Uses the in-cluster service account unless --kubeconfig is given.
        #[arg(long, env = "MESHACCEL_NODE_NAME")]
        node_name: Option<String>,
        /// kubeconfig file for the Kubernetes API (default: in-cluster configuration).
        #[arg(long, env = "MESHACCEL_KUBECONFIG", requires = "node_name")]
        kubeconfig: Option<PathBuf>,
        /// The label key namespaces (and pods, to override) opt in with: `<key>=true`.
        #[arg(long, env = "MESHACCEL_OPT_IN_LABEL", default_value = meshaccel::sources::kube::ENABLED_LABEL, value_parser = meshaccel::sources::kube::OptInLabel::parse)]
        opt_in_label: meshaccel::sources::kube::OptInLabel,
        #[command(flatten)]
        istiod: meshaccel::sources::xds::IstiodArgs,
    },
    /// Per workload: accelerated sockets and bytes; the global counters and the sockhash fill.
    /// Reads the pinned maps (no agent needed) and the agent's state file for workload names.
    Status {
        #[arg(long, env = "MESHACCEL_BPFFS", default_value = "/sys/fs/bpf/meshaccel")]
        bpffs: PathBuf,
        #[arg(long, short, env = "MESHACCEL_OUTPUT", value_enum, default_value_t = Output::Text)]
        output: Output,
        /// The agent's run folder (its state file names the workloads).
        #[arg(long, env = "MESHACCEL_STATE_DIR", default_value = state_files::DEFAULT_DIR)]
        state_dir: PathBuf,
        /// Also list every socket meshaccel holds (client endpoint, role, workload netns, leg).
        #[arg(long)]
        sockets: bool,
    },
    /// Checks whether acceleration can work on this node (kernel support probed by loading
    /// programs and creating maps, BTF, cgroup v2, bpffs, other sockmap programs, Istio capture
    /// in pod network namespaces); prints what is wrong and how to fix it. Exits 1 when
    /// acceleration cannot work.
    Doctor {
        /// cgroup v2 folder the agent attaches to (default: the cgroup v2 root from /proc/mounts).
        #[arg(long, env = "MESHACCEL_CGROUP")]
        cgroup: Option<PathBuf>,
        #[arg(long, env = "MESHACCEL_BPFFS", default_value = "/sys/fs/bpf/meshaccel")]
        bpffs: PathBuf,
        /// A pod's network namespace (/proc/PID/ns/net or /run/netns/NAME) to check Istio's
        /// capture rules in; repeatable.
        #[arg(long)]
        netns: Vec<PathBuf>,
        #[arg(long, short, env = "MESHACCEL_OUTPUT", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Switch acceleration off and remove everything meshaccel pinned. Live accelerated
    /// connections continue on TCP without losing a byte; the kernel frees the programs and maps
    /// when the last of them closes.
    Uninstall {
        #[arg(long, env = "MESHACCEL_BPFFS", default_value = "/sys/fs/bpf/meshaccel")]
        bpffs: PathBuf,
        #[arg(long, short, env = "MESHACCEL_OUTPUT", value_enum, default_value_t = Output::Text)]
        output: Output,
        /// The agent's run folder (its state file is removed too).
        #[arg(long, env = "MESHACCEL_STATE_DIR", default_value = state_files::DEFAULT_DIR)]
        state_dir: PathBuf,
        /// How long to wait for live accelerated connections to close (the kernel frees
        /// meshaccel's programs and maps after the last one); 0 reports at once.
        #[arg(long, env = "MESHACCEL_UNINSTALL_WAIT_SECS", default_value_t = 10)]
        wait_secs: u64,
    },
}

fn init_logs(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("--log / MESHACCEL_LOG: bad filter {filter:?}"))?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format, &cli.log)?;
    match cli.command {
        Command::Agent {
            cgroup,
            bpffs,
            workloads,
            poll_ms,
            resync_secs,
            sockhash_capacity,
            replace_programs,
            install_generation,
            max_unread_bytes,
            keepalive_secs,
            small_write_secs,
            metrics_addr,
            state_dir,
            node_name,
            kubeconfig,
            opt_in_label,
            istiod,
        } => {
            let cgroup = match cgroup {
                Some(c) => c,
                None => cgroup::cgroup2_root()
                    .context("no cgroup v2 mount in /proc/mounts: mount one, or pass --cgroup")?,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let ads = istiod.config();
            let mut required = Vec::new();
            if workloads.is_some() {
                required.push(Source::StaticFile);
            }
            if node_name.is_some() {
                required.push(Source::Kubernetes);
            }
            if ads.is_some() {
                required.push(Source::Xds);
            }
            let shared = std::sync::Arc::new(agent::Shared::new(
                &bpffs,
                state_files::StateFile::new(&state_dir, &bpffs),
                meshaccel::desired::Tuning {
                    max_unread_bytes,
                    keepalive_secs,
                    small_write_secs,
                },
                &required,
            ));
            if let Some(node) = node_name {
                let opts = meshaccel::sources::kube::KubeOptions {
                    opt_in_label,
                    ..meshaccel::sources::kube::KubeOptions::new(node, kubeconfig)
                };
                rt.block_on(meshaccel::sources::kube::spawn(opts, shared.clone()))?;
            }
            if let Some(cfg) = ads {
                let status = state_files::xds_status_path(&state_dir, &bpffs);
                rt.spawn(meshaccel::sources::xds::run(cfg, shared.clone(), status));
            }
            rt.block_on(async {
                if let Some(addr) = metrics_addr {
                    let (_, serve) = http::bind(addr, shared.clone()).await?;
                    tokio::spawn(serve);
                }
                agent::run_with(
                    agent::AgentConfig {
                        cgroup,
                        bpffs,
                        workloads,
                        poll: Duration::from_millis(poll_ms),
                        resync: Duration::from_secs(resync_secs),
                        install: meshaccel::dataplane::InstallOptions {
                            sockhash_capacity,
                            replace_programs,
                            generation: install_generation,
                        },
                    },
                    shared,
                )
                .await
            })?;
        }
        Command::Status {
            bpffs,
            output,
            state_dir,
            sockets,
        } => {
            let report = status::collect(&bpffs, &state_dir, sockets)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&report)?),
                Output::Text => print!("{}", report.render_text()),
            }
        }
        Command::Doctor {
            cgroup,
            bpffs,
            netns,
            output,
        } => {
            let report = doctor::run(&doctor::DoctorConfig {
                cgroup,
                bpffs,
                netns,
            });
            match output {
                Output::Json => println!("{}", serde_json::to_string(&report)?),
                Output::Text => print!("{}", report.render_text()),
            }
            if !report.ok {
                std::process::exit(1);
            }
        }
        Command::Uninstall {
            bpffs,
            output,
            state_dir,
            wait_secs,
        } => {
            let r = dataplane::uninstall(&bpffs, Duration::from_secs(wait_secs))?;
            state_files::remove(&state_dir, &bpffs)?;
            state_files::remove_xds_status(&state_dir, &bpffs);
            match output {
                Output::Json => println!("{}", serde_json::to_string(&r)?),
                Output::Text => {
                    println!(
                        "removed {} pins under {}",
                        r.removed_pins.len(),
                        bpffs.display()
                    );
                    if r.drained {
                        println!("no meshaccel program or map is left in the kernel");
                    } else {
                        println!(
                            "still draining: {} sockets open ({} programs, {} maps kept alive by them); they continue on TCP without losing a byte, and the kernel frees the rest when they close. Run `meshaccel uninstall` again to check.",
                            r.sockets_draining,
                            r.programs_left.len(),
                            r.maps_left.len()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
