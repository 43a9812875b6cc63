//! The `meshaccel` command: agent, status, uninstall.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use meshaccel::{agent, cgroup, dataplane};

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
    },
    /// Counters and the number of sockets in the sockhash.
    Status {
        #[arg(long, env = "MESHACCEL_BPFFS", default_value = "/sys/fs/bpf/meshaccel")]
        bpffs: PathBuf,
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
        } => {
            let cgroup = match cgroup {
                Some(c) => c,
                None => cgroup::cgroup2_root()
                    .context("no cgroup v2 mount in /proc/mounts: mount one, or pass --cgroup")?,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(agent::run(agent::AgentConfig {
                cgroup,
                bpffs,
                workloads,
                poll: Duration::from_millis(poll_ms),
                resync: Duration::from_secs(resync_secs),
            }))?;
        }
        Command::Status { bpffs, output } => {
            let st = dataplane::Dataplane::open(&bpffs)?.status()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&st)?),
                Output::Text => {
                    println!("bpffs:            {}", st.bpffs.display());
                    println!(
                        "acceleration:     {}",
                        if st.enabled { "on" } else { "off" }
                    );
                    println!("sockets:          {}", st.sockets);
                    println!("workloads on:     {}", st.workloads_enabled);
                    println!("excluded ports:   {}", st.excluded_ports);
                    for (k, v) in &st.counters {
                        println!("{k:<26}{v}");
                    }
                }
            }
        }
        Command::Uninstall { bpffs, output } => {
            let r = dataplane::uninstall(&bpffs)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&r)?),
                Output::Text => {
                    println!(
                        "removed {} pins under {}",
                        r.removed_pins.len(),
                        bpffs.display()
                    );
                    if r.sockets_draining > 0 {
                        println!(
                            "{} sockets still open: they continue on TCP; the kernel frees meshaccel's programs and maps when they close",
                            r.sockets_draining
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
