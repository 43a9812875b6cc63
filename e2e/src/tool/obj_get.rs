//! `obj-get`: opens a pinned BPF object (BPF_OBJ_GET) as whoever runs the tool.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

#[derive(Args, Clone, Debug)]
pub struct ObjGetArgs {
    path: PathBuf,
    /// Ask for a read-only fd (BPF_F_RDONLY) instead of a read-write one.
    #[arg(long)]
    read_only: bool,
}

/// Prints `{"ok":true}` or `{"ok":false,"errno":N,"error":"…"}`; fails only to print.
pub fn run(args: &ObjGetArgs) -> anyhow::Result<()> {
    let flags = if args.read_only {
        crate::bpf::BPF_F_RDONLY
    } else {
        0
    };
    let v = match crate::bpf::obj_get(&args.path, flags) {
        Ok(_) => json!({ "ok": true }),
        Err(e) => json!({ "ok": false, "errno": e.raw_os_error(), "error": e.to_string() }),
    };
    println!("{v}");
    Ok(())
}
