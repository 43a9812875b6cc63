//! The `meshaccel` command: agent, status, doctor, uninstall.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use meshaccel::{
    agent,
    config::{AgentArgs, Bpffs, Cgroup, StateDir},
    dataplane, doctor, state_files, status,
};

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

#[derive(clap::Args)]
struct OutputArg {
    #[arg(long, short, env = "MESHACCEL_OUTPUT", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

impl Output {
    fn print<T: serde::Serialize>(
        self,
        report: &T,
        text: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        match self {
            Output::Json => println!("{}", serde_json::to_string(report)?),
            Output::Text => print!("{}", text(report)),
        }
        Ok(())
    }
}

#[derive(Subcommand)]
// Parsed once at start: the size of the agent variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Load and attach the programs (or adopt the pinned ones) and keep the maps equal to the
    /// workloads file. Stopping the agent leaves acceleration in place.
    Agent(AgentArgs),
    /// Per workload: accelerated sockets and bytes; the global counters and the sockhash fill.
    /// Reads the pinned maps (no agent needed) and the agent's state file for workload names.
    Status {
        #[command(flatten)]
        bpffs: Bpffs,
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        state_dir: StateDir,
        /// Also list every socket meshaccel holds (client endpoint, role, workload netns, leg).
        #[arg(long)]
        sockets: bool,
    },
    /// Checks whether acceleration can work on this node (kernel support probed by loading
    /// programs and creating maps, BTF, cgroup v2, bpffs, other sockmap programs, Istio capture
    /// in pod network namespaces); prints what is wrong and how to fix it. Exits 1 when
    /// acceleration cannot work.
    Doctor {
        #[command(flatten)]
        cgroup: Cgroup,
        #[command(flatten)]
        bpffs: Bpffs,
        /// A pod's network namespace (/proc/PID/ns/net or /run/netns/NAME) to check Istio's
        /// capture rules in; repeatable.
        #[arg(long)]
        netns: Vec<PathBuf>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Switch acceleration off and remove everything meshaccel pinned. Live accelerated
    /// connections continue on TCP without losing a byte; the kernel frees the programs and maps
    /// when the last of them closes.
    Uninstall {
        #[command(flatten)]
        bpffs: Bpffs,
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        state_dir: StateDir,
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
        Command::Agent(args) => {
            let cfg = args.config()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))?;
        }
        Command::Status {
            bpffs: Bpffs { bpffs },
            output: OutputArg { output },
            state_dir: StateDir { state_dir },
            sockets,
        } => {
            let report = status::collect(&bpffs, &state_dir, sockets)?;
            output.print(&report, |r| r.render_text())?;
        }
        Command::Doctor {
            cgroup: Cgroup { cgroup },
            bpffs: Bpffs { bpffs },
            netns,
            output: OutputArg { output },
        } => {
            let report = doctor::run(&doctor::DoctorConfig {
                cgroup,
                bpffs,
                netns,
            });
            output.print(&report, |r| r.render_text())?;
            if !report.ok {
                std::process::exit(1);
            }
        }
        Command::Uninstall {
            bpffs: Bpffs { bpffs },
            output: OutputArg { output },
            state_dir: StateDir { state_dir },
            wait_secs,
        } => {
            let r = dataplane::uninstall(&bpffs, Duration::from_secs(wait_secs))?;
            state_files::remove(&state_dir, &bpffs)?;
            state_files::remove_xds_status(&state_dir, &bpffs);
            output.print(&r, |r| {
                let mut text = format!(
                    "removed {} pins under {}\n",
                    r.removed_pins.len(),
                    bpffs.display()
                );
                if r.drained {
                    text.push_str("no meshaccel program or map is left in the kernel\n");
                } else {
                    text.push_str(&format!(
                        "still draining: {} sockets open ({} programs, {} maps kept alive by them); they continue on TCP without losing a byte, and the kernel frees the rest when they close. Run `meshaccel uninstall` again to check.\n",
                        r.sockets_draining,
                        r.programs_left.len(),
                        r.maps_left.len()
                    ));
                }
                text
            })?;
        }
    }
    Ok(())
}
