//! `istio-iptables`: what Istio's `istio-init` container runs, for the pods of the cluster tests
//! (there is no Istio image here). It takes istio-iptables' own arguments, as a real injector
//! writes them into the pod spec (the agent reads the same arguments back from the spec), renders
//! the capture rules with `istio_integration::capture` (proven equal to Istio's output by that
//! crate's tests) and applies them with `iptables-restore` in the pod's network namespace.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::Args;
use istio_integration::{annotations::CaptureFlags, capture::CaptureConfig};

#[derive(Args, Debug)]
pub struct IstioIptablesArgs {
    /// istio-iptables arguments (`-p 15001 -z 15006 -u 1337 -m REDIRECT ...`); flags other than
    /// the ports and the proxy uid keep Istio's defaults.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Print the rules instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
}

/// The capture configuration istio-iptables' arguments describe.
pub fn config(args: &[String]) -> anyhow::Result<CaptureConfig> {
    let flags = CaptureFlags::parse_istio_iptables(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut cfg = CaptureConfig::default();
    if let Some(p) = flags.outbound_port {
        cfg.proxy_port = p;
    }
    if let Some(p) = flags.inbound_port {
        cfg.inbound_capture_port = p;
    }
    if let Some(u) = flags.proxy_uid {
        cfg.proxy_uid = u;
        cfg.proxy_gid = u;
    }
    Ok(cfg)
}

pub fn run(a: &IstioIptablesArgs) -> anyhow::Result<()> {
    let rules = config(&a.args)?.render_nat();
    if a.dry_run {
        print!("{rules}");
        return Ok(());
    }
    let mut child = Command::new("iptables-restore")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iptables-restore")?;
    child
        .stdin
        .take()
        .context("iptables-restore stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprintln!("istio-iptables: capture rules applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_injectors_arguments_set_ports_and_uid() {
        // The injector's own arguments, with the inbound capture port moved (as the
        // `-z` of a customised injection would).
        let args: Vec<String> = istio_integration::annotations::INJECTOR_INIT_ARGS
            .iter()
            .map(|s| if *s == "15006" { "15106" } else { s }.to_string())
            .collect();
        let cfg = config(&args).unwrap();
        assert_eq!(cfg.inbound_capture_port, 15106);
        assert_eq!(cfg.proxy_port, 15001);
        assert_eq!(cfg.proxy_uid, 1337);
        assert!(cfg.render_nat().contains("--to-ports 15106"));
    }
}
