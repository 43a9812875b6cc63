//! The cluster tests' images, built from their Dockerfiles without docker or a registry
//! (e2e/src/image.rs), imported into a private containerd of this run and run there:
//!
//! - `meshaccel.local/meshaccel`: accelerator/Dockerfile's runtime stage with the host-built
//!   `target/<profile>/meshaccel` as the `build` stage's `/out/meshaccel`;
//! - `meshaccel.local/envoy`: e2e/images/envoy/Dockerfile with the real Envoy 1.40
//!   (`scripts/install-envoy.sh`), uid 1337, iptables of the host's flavour;
//! - `meshaccel.local/app`: e2e/images/app/Dockerfile with `meshaccel-e2e-tool`.
//!
//! Needs root, `scripts/install-cluster.sh` (containerd, runc, debootstrap), Envoy
//! (`scripts/install-envoy.sh`), the workspace's binaries (`cargo build --workspace --bins`) and
//! the Debian mirror for the first build (the base rootfs and RUN results are cached under
//! `$MESHACCEL_CACHE`). Run: `cargo test -p meshaccel-e2e --test images -- --nocapture`.

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use meshaccel_e2e::{
    containerd::Containerd,
    envoy::{ENVOY_VERSION, envoy_binary},
    image::{BuildRequest, BuiltImage, build},
    require_root, workspace_bin,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn agent_request() -> BuildRequest {
    let mut req = BuildRequest::new(
        repo().join("accelerator/Dockerfile"),
        "meshaccel.local/meshaccel:test",
    );
    req.stage_file("build", "/out/meshaccel", workspace_bin("meshaccel"));
    req
}

fn envoy_request() -> BuildRequest {
    let envoy = envoy_binary().unwrap_or_else(|e| panic!("{e:#}"));
    let mut req = BuildRequest::new(
        repo().join("e2e/images/envoy/Dockerfile"),
        "meshaccel.local/envoy:test",
    );
    req.context(envoy.parent().expect("envoy has a directory"))
        .stage_file("tool", "/meshaccel-e2e-tool", support::tool());
    req
}

fn app_request() -> BuildRequest {
    let tool = support::tool();
    let mut req = BuildRequest::new(
        repo().join("e2e/images/app/Dockerfile"),
        "meshaccel.local/app:test",
    );
    req.context(tool.parent().expect("the tool has a directory"));
    req
}

fn timed_build(req: &BuildRequest, out: &Path) -> BuiltImage {
    let started = Instant::now();
    let image = build(req, out).unwrap_or_else(|e| panic!("building {}: {e:#}", req.reference));
    eprintln!(
        "[images] {} built in {:.1?}",
        req.reference,
        started.elapsed()
    );
    image
}

/// The iptables flavour (`nf_tables` or `legacy`) in `iptables -V` output.
fn flavour(version_output: &str) -> &'static str {
    if version_output.contains("nf_tables") {
        "nf_tables"
    } else if version_output.contains("legacy") {
        "legacy"
    } else {
        "unknown"
    }
}

fn stdout_of(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout {stdout:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn run(c: &mut Containerd, image: &str, args: &[&str]) -> String {
    let what = format!("{image}: {}", args.join(" "));
    let out = c
        .run(image, args)
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    stdout_of(&what, &out)
}

#[test]
fn images_build_import_and_run_in_containerd() {
    require_root();
    let host_iptables = Command::new("iptables")
        .arg("-V")
        .output()
        .expect("iptables -V on the host (scripts/env.sh installs it)");
    let host_flavour = flavour(&String::from_utf8_lossy(&host_iptables.stdout));

    let out = tempfile::Builder::new()
        .prefix("meshaccel-images-")
        .tempdir()
        .expect("temp dir");
    let agent = timed_build(&agent_request(), &out.path().join("meshaccel.tar"));
    let envoy = timed_build(&envoy_request(), &out.path().join("envoy.tar"));
    let app = timed_build(&app_request(), &out.path().join("app.tar"));

    let mut c = Containerd::start().unwrap_or_else(|e| panic!("{e:#}"));
    for image in [&agent, &envoy, &app] {
        let started = Instant::now();
        c.import(&image.tarball).unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!(
            "[images] imported {} in {:.1?}",
            image.reference,
            started.elapsed()
        );
    }
    let names = c.image_names().expect("ctr images list");
    for image in [&agent, &envoy, &app] {
        assert!(
            names.contains(&image.reference),
            "{} not among the imported images {names:?}",
            image.reference
        );
    }

    // The agent: its binary runs, as root, with the host's iptables flavour (`doctor --netns`).
    let a = agent.reference.as_str();
    let version = run(&mut c, a, &["/usr/local/bin/meshaccel", "--version"]);
    assert!(
        version.contains("meshaccel"),
        "meshaccel --version: {version:?}"
    );
    assert_eq!(run(&mut c, a, &["id", "-u"]).trim(), "0");
    let ipt = run(&mut c, a, &["iptables", "-V"]);
    assert_eq!(flavour(&ipt), host_flavour, "agent image: {ipt:?}");

    // Envoy: the real 1.40 release, as Istio's proxy uid, with iptables-restore and a shell for
    // the init container.
    let e = envoy.reference.as_str();
    let version = run(&mut c, e, &["/usr/local/bin/envoy", "--version"]);
    assert!(
        version.contains(&format!("/{ENVOY_VERSION}/")),
        "envoy --version: {version:?}"
    );
    assert_eq!(run(&mut c, e, &["id", "-u"]).trim(), "1337");
    assert_eq!(run(&mut c, e, &["id", "-g"]).trim(), "1337");
    let ipt = run(&mut c, e, &["iptables-restore", "--version"]);
    assert_eq!(flavour(&ipt), host_flavour, "envoy image: {ipt:?}");
    assert_eq!(run(&mut c, e, &["/bin/sh", "-c", "echo ok"]).trim(), "ok");

    // The app: the image's own ENTRYPOINT (no args given) is the tool, as uid 1000.
    let p = app.reference.as_str();
    let usage = c.run(p, &[]).expect("running the app image");
    let stderr = String::from_utf8_lossy(&usage.stderr);
    assert!(
        stderr.contains("Usage: meshaccel-e2e-tool"),
        "the app image's entrypoint is not the tool: {usage:?}"
    );
    run(&mut c, p, &["/usr/local/bin/meshaccel-e2e-tool", "--help"]);
    assert_eq!(run(&mut c, p, &["id", "-u"]).trim(), "1000");
}

/// A second build of an image reuses the cached base and RUN results: the same layer, so the
/// same manifest, and in seconds.
#[test]
fn rebuild_uses_the_cache_and_is_reproducible() {
    require_root();
    let out = tempfile::Builder::new()
        .prefix("meshaccel-images-")
        .tempdir()
        .expect("temp dir");
    let first = timed_build(&agent_request(), &out.path().join("a.tar"));
    let started = Instant::now();
    let second = timed_build(&agent_request(), &out.path().join("b.tar"));
    let cached = started.elapsed();
    assert_eq!(
        first.manifest_digest, second.manifest_digest,
        "a rebuild from the cache must give the same image"
    );
    assert!(
        cached.as_secs() < 60,
        "a cached rebuild took {cached:?} (the RUN step was not cached?)"
    );
}
