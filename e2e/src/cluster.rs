//! A one-node Kubernetes on this machine, for tests: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and a kubelet (v1.20.2, built from Debian's source
//! package by scripts/install-kube.sh) over a private containerd + runc, pods on a CNI bridge.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use meshaccel_e2e::cluster::Cluster;
//! let cluster = Cluster::start()?; // node Ready, images of the run importable
//! cluster.import_image(std::path::Path::new("app.oci.tar"))?;
//! let out = cluster.kubectl(&["get", "pods", "-A"])?;
//! # Ok(()) }
//! // Dropped (also while a test panics): every process, container, mount, netns, cgroup,
//! // interface and iptables rule of the run removed.
//! ```
//!
//! Layout of a run (`<id>`: 6 random hex digits; every name carries it):
//! - Pods: CNI `bridge` + `host-local` on bridge `mak<id>` in the host's network namespace, pod
//!   subnet `10.213.<n>.0/24` (gateway `.1` on the bridge), service range `10.214.<n>.0/24`.
//!   Everything the tests send stays on these addresses.
//! - The API server binds the bridge's gateway address, so pods reach it; there is no
//!   kube-proxy: one DNAT rule (comment `ma-<id>`) sends the `kubernetes` Service's cluster IP to
//!   it, which is all in-cluster clients (the agent, the uninstall hook) need.
//! - containerd: its own config, root, state and socket in the run's folder (containerd 1.6 still
//!   puts shim sockets, FIFOs and runc state under /run/containerd: unique names; teardown removes
//!   the folders it created there); it shares the host's mount namespace, since the kubelet's
//!   volume mounts and its netns pins must be seen by both and by the agent; images are imported
//!   (there is no registry), the sandbox image `meshaccel.local/pause:<version>` is built here
//!   from the `pause` binary install-kube.sh builds from the same source tree.
//! - cgroups: the kubelet's `--cgroup-root=/ma-<id>` in every cgroup v1 controller (cgroupfs
//!   driver, as this machine mounts v1 controllers with cgroup v2 beside them); containerd, its
//!   shims and the kubelet run in the v2 cgroup `ma-<id>-runtime`, so a teardown finds every
//!   process of the run.
//! - Pod network namespaces are pinned by containerd under /run/netns (`cni-<uuid>`, where the
//!   chart's agent looks for them); teardown removes the pins that appeared during the run.
use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cgroup,
    kube_api::{ApiOptions, KubeApi, apiserver_binary, stop, tail},
};

/// The sandbox ("pause") image every pod starts with, built per run from the cached binary.
pub const PAUSE_IMAGE: &str = "meshaccel.local/pause:v1.20.2";
/// kubectl of the same version as registry.k8s.io/kubectl packs it (FROM scratch, entrypoint
/// kubectl), for in-cluster Jobs such as the chart's uninstall hook (`uninstallHook.kubectlImage`).
pub const KUBECTL_IMAGE: &str = "meshaccel.local/kubectl:v1.20.2";
/// containerd's namespace for Kubernetes (CRI) images and containers.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Where containerd pins pod network namespaces (and where the chart's agent reads them).
const NETNS_DIR: &str = "/run/netns";
/// libcni's result cache (containerd 1.6 does not move it): files named `<network>-<id>-<if>`.
const CNI_CACHE: &str = "/var/lib/cni/results";

/// One running single-node cluster. See the module docs.
pub struct Cluster {
    id: String,
    net: NodeNetwork,
    cgroups: Cgroups,
    /// etcd and the API server; [`Drop`] stops them after the node's own components.
    api: Option<KubeApi>,
    containerd: Option<Child>,
    controller_manager: Option<Child>,
    scheduler: Option<Child>,
    kubelet: Option<Child>,
    dir: PathBuf,
    kube_dir: PathBuf,
    netns_before: BTreeSet<String>,
    /// Host folders containerd and libcni create on first use that did not exist before the
    /// run; removed again at teardown when empty.
    new_host_dirs: Vec<PathBuf>,
}

/// Folders outside the run's own that containerd 1.6 (shim sockets, FIFOs, runc state) and
/// libcni (result cache) create.
const HOST_DIRS: [&str; 2] = ["/run/containerd", "/var/lib/cni"];

/// Addresses and names of the run's pod network.
#[derive(Clone, Debug)]
pub struct NodeNetwork {
    pub bridge: String,
    /// The CNI network's name (also libcni's cache file prefix).
    pub network: String,
    pub pod_subnet: (Ipv4Addr, u8),
    /// On the bridge: the pods' default gateway, the node's address, the API server's.
    pub gateway: Ipv4Addr,
    pub service_cidr: (Ipv4Addr, u8),
    dnat: Option<Vec<String>>,
    bridge_up: bool,
}

impl NodeNetwork {
    /// The iptables arguments (after `-t nat -A|-D`) of the rule standing in for kube-proxy.
    fn dnat_rule(&self, service_ip: Ipv4Addr, port: u16, comment: &str) -> Vec<String> {
        [
            "PREROUTING",
            "-d",
            &format!("{service_ip}/32"),
            "-p",
            "tcp",
            "--dport",
            "443",
            "-m",
            "comment",
            "--comment",
            comment,
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{}:{port}", self.gateway),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// The run's cgroups: `ma-<id>` in each v1 controller (the kubelet's cgroup root) and the v2
/// `ma-<id>-runtime` (containerd, shims, kubelet).
struct Cgroups {
    v1_roots: Vec<PathBuf>,
    runtime: Option<PathBuf>,
    /// The kubelet's root in the v2 hierarchy, should runc place containers there too.
    v2_root: Option<PathBuf>,
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

fn random_u32() -> anyhow::Result<u32> {
    let mut b = [0u8; 4];
    // SAFETY: b is valid for writes of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(std::io::Error::last_os_error()).context("getrandom");
    }
    Ok(u32::from_ne_bytes(b))
}

fn on_path(name: &str, install: &str) -> anyhow::Result<PathBuf> {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found on PATH: run {install}")
}

/// Names of the pinned network namespaces (containerd's are `cni-<uuid>`).
fn pinned_netns() -> BTreeSet<String> {
    fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

fn umount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 on a mount point this run's components made.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A child that joins `cgroup` (v2) before exec and dies with the thread that started it.
fn spawn_in(mut cmd: Command, cgroup: Option<&Path>, log: &Path) -> anyhow::Result<Child> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let procs = cgroup
        .map(|c| std::ffi::CString::new(c.join("cgroup.procs").as_os_str().as_encoded_bytes()))
        .transpose()?;
    // SAFETY: only async-signal-safe calls (prctl, open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(p) = &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

impl Cluster {
    /// Brings the node up and waits until it is Ready (a minute or so; longer the first time
    /// containerd unpacks an image).
    pub fn start() -> anyhow::Result<Cluster> {
        crate::require_root();
        let kube_dir = apiserver_binary()?
            .parent()
            .context("kube-apiserver has no folder")?
            .to_path_buf();
        for bin in [
            "kubelet",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
            "pause",
        ] {
            if !kube_dir.join(bin).is_file() {
                bail!(
                    "{} missing: run scripts/install-kube.sh (it builds all Kubernetes binaries)",
                    kube_dir.join(bin).display()
                );
            }
        }
        for bin in ["containerd", "ctr", "runc", "iptables"] {
            on_path(bin, "scripts/install-cluster.sh")?;
        }
        if !Path::new("/usr/lib/cni/bridge").is_file() {
            bail!(
                "/usr/lib/cni/bridge missing: run scripts/install-cluster.sh (Debian containernetworking-plugins)"
            );
        }

        let id = format!("{:06x}", random_u32()? & 0xff_ffff);
        let n = pick_subnet_octet()?;
        let dir = std::env::temp_dir().join(format!("meshaccel-cluster-{id}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cluster = Cluster {
            net: NodeNetwork {
                bridge: format!("mak{id}"),
                network: format!("ma-{id}"),
                pod_subnet: (Ipv4Addr::new(10, 213, n, 0), 24),
                gateway: Ipv4Addr::new(10, 213, n, 1),
                service_cidr: (Ipv4Addr::new(10, 214, n, 0), 24),
                dnat: None,
                bridge_up: false,
            },
            cgroups: Cgroups {
                v1_roots: Vec::new(),
                runtime: None,
                v2_root: None,
            },
            api: None,
            containerd: None,
            controller_manager: None,
            scheduler: None,
            kubelet: None,
            dir,
            kube_dir,
            netns_before: pinned_netns(),
            new_host_dirs: HOST_DIRS
                .iter()
                .map(PathBuf::from)
                .filter(|p| !p.exists())
                .collect(),
            id,
        };
        cluster.bring_up()?;
        Ok(cluster)
    }

    fn bring_up(&mut self) -> anyhow::Result<()> {
        // The node's BPF filesystem (the chart's hostPaths.bpffs): one of the run, so the
        // agent's pins are the run's.
        let bpffs = self.bpffs();
        fs::create_dir_all(&bpffs)?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))
            .context("mounting the run's bpffs")?;
        self.make_network()?;
        self.make_cgroups()?;
        let options = ApiOptions {
            address: self.net.gateway,
            service_cidr: self.net.service_cidr,
            service_accounts: true,
        };
        let api = KubeApi::start_with(options.clone())?;
        let rule = self.net.dnat_rule(
            options.kubernetes_service_ip(),
            api.port(),
            &format!("ma-{}", self.id),
        );
        self.api = Some(api);
        let mut args = vec!["-t".to_string(), "nat".into(), "-A".into()];
        args.extend(rule.iter().cloned());
        run(Command::new("iptables").args(&args)).context("adding the kubernetes Service DNAT")?;
        self.net.dnat = Some(rule);

        self.start_containerd()?;
        self.import_node_images()?;
        self.start_control_plane()?;
        self.start_kubelet()?;
        self.wait_node_ready(Duration::from_secs(120))
    }

    fn make_network(&mut self) -> anyhow::Result<()> {
        let br = &self.net.bridge;
        run(Command::new("ip").args(["link", "add", br, "type", "bridge"]))?;
        self.net.bridge_up = true;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/{}", self.net.gateway, self.net.pod_subnet.1),
            "dev",
            br,
        ]))?;
        run(Command::new("ip").args(["link", "set", br, "up"]))?;
        // containerd's CNI config: the bridge plugin on our bridge, addresses from the run's folder
        // (host-local's default dataDir is under /var/lib/cni).
        let conf_dir = self.dir.join("cni");
        fs::create_dir_all(&conf_dir)?;
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.net.network,
            "plugins": [{
                "type": "bridge",
                "bridge": br,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.dir.join("ipam"),
                    "ranges": [[{
                        "subnet": format!("{}/{}", self.net.pod_subnet.0, self.net.pod_subnet.1),
                        "gateway": self.net.gateway.to_string(),
                    }]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }],
        });
        fs::write(
            conf_dir.join("10-meshaccel.conflist"),
            serde_json::to_vec_pretty(&conf)?,
        )?;
        Ok(())
    }

    fn make_cgroups(&mut self) -> anyhow::Result<()> {
        let name = format!("ma-{}", self.id);
        let v2 = cgroup::cgroup2_mount()?;
        for entry in fs::read_dir("/sys/fs/cgroup").context("reading /sys/fs/cgroup")? {
            let path = entry?.path();
            // v1 controllers are directories with cgroup.procs; skip the v2 mount and symlinks
            // (cpu -> cpu,cpuacct).
            if path == v2 || fs::symlink_metadata(&path)?.file_type().is_symlink() {
                continue;
            }
            if !path.join("cgroup.procs").is_file() {
                continue;
            }
            let root = path.join(&name);
            fs::create_dir(&root).with_context(|| format!("mkdir {}", root.display()))?;
            self.cgroups.v1_roots.push(root);
        }
        if v2 != Path::new("/sys/fs/cgroup") {
            let root = v2.join(&name);
            fs::create_dir(&root).with_context(|| format!("mkdir {}", root.display()))?;
            self.cgroups.v2_root = Some(root);
        }
        let runtime = v2.join(format!("{name}-runtime"));
        fs::create_dir(&runtime).with_context(|| format!("mkdir {}", runtime.display()))?;
        self.cgroups.runtime = Some(runtime);
        Ok(())
    }

    fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn start_containerd(&mut self) -> anyhow::Result<()> {
        let d = &self.dir;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    # Without CAP_SYS_RESOURCE (this machine's root lacks it) a negative oom_score_adj, which the
    # kubelet asks for the sandbox, fails in runc; containerd then keeps its own (0) instead.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{cni}"
"#,
            root = d.join("containerd-root").display(),
            state = d.join("containerd-state").display(),
            sock = self.containerd_socket().display(),
            opt = d.join("containerd-opt").display(),
            cni = d.join("cni").display(),
        );
        let path = d.join("containerd.toml");
        fs::write(&path, config)?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&path);
        let log = d.join("containerd.log");
        self.containerd = Some(spawn_in(cmd, self.cgroups.runtime.as_deref(), &log)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ctr(&["version"]).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.containerd.as_mut().map(|c| c.try_wait()) {
                self.containerd = None;
                bail!("containerd exited ({st}):\n{}", tail(&log));
            }
            if Instant::now() > deadline {
                bail!("containerd not serving within 30 s:\n{}", tail(&log));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr --address <run's socket> -n k8s.io <args>`; its stdout on success.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(Command::new("ctr")
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["-n", CRI_NAMESPACE])
            .args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an OCI image archive (`ctr images import`); its reference names come from the
    /// archive's index.
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        let path = archive
            .to_str()
            .context("image archive path is not UTF-8")?;
        self.ctr(&["images", "import", "--no-unpack", path])
            .with_context(|| format!("importing {}", archive.display()))
            .map(drop)
    }

    /// The images a node gets from its installation rather than a registry: the pause image
    /// (as Kubernetes' build/pause Dockerfile makes it: FROM scratch, the binary, USER 65535)
    /// and kubectl's.
    fn import_node_images(&self) -> anyhow::Result<()> {
        for (bin, user, reference) in [
            ("pause", Some("65535:65535"), PAUSE_IMAGE),
            ("kubectl", Some("65534:65534"), KUBECTL_IMAGE),
        ] {
            let config = crate::image::ImageConfig {
                user: user.map(String::from),
                entrypoint: Some(vec![format!("/{bin}")]),
                ..Default::default()
            };
            let archive = self.dir.join(format!("{bin}.oci.tar"));
            crate::image::scratch_image(
                &[(self.kube_dir.join(bin), format!("/{bin}"))],
                &config,
                reference,
                &archive,
            )?;
            self.import_image(&archive)?;
        }
        Ok(())
    }

    fn start_control_plane(&mut self) -> anyhow::Result<()> {
        let api = self.api.as_ref().context("no API server")?;
        let kubeconfig = api.admin_kubeconfig().to_path_buf();
        let mut kcm = Command::new(self.kube_dir.join("kube-controller-manager"));
        kcm.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                api.sa_key_path().display()
            ))
            .arg(format!("--root-ca-file={}", api.ca_path().display()))
            .args([
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                "--use-service-account-credentials=false",
                "--allocate-node-cidrs=false",
                // Tests stop the API server on purpose: the node's heartbeats must not look
                // lost (40 s by default) in the time it takes to come back.
                "--node-monitor-grace-period=2m",
                "--v=1",
            ]);
        self.controller_manager = Some(spawn_in(
            kcm,
            None,
            &self.dir.join("kube-controller-manager.log"),
        )?);
        let mut sched = Command::new(self.kube_dir.join("kube-scheduler"));
        sched
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args([
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                "--v=1",
            ]);
        self.scheduler = Some(spawn_in(sched, None, &self.dir.join("kube-scheduler.log"))?);
        Ok(())
    }

    /// The node's name (the kubelet's `--hostname-override`).
    pub fn node_name(&self) -> String {
        format!("ma-{}-node", self.id)
    }

    fn start_kubelet(&mut self) -> anyhow::Result<()> {
        let api = self.api.as_ref().context("no API server")?;
        let root = self.dir.join("kubelet");
        fs::create_dir_all(&root)?;
        let port = {
            let l = std::net::TcpListener::bind((self.net.gateway, 0))?;
            l.local_addr()?.port()
        };
        let mut cmd = Command::new(self.kube_dir.join("kubelet"));
        cmd.arg(format!("--kubeconfig={}", api.admin_kubeconfig().display()))
            .arg(format!("--hostname-override={}", self.node_name()))
            // The API server's client certificate (exec, logs) is signed by the run's CA.
            .arg(format!("--client-ca-file={}", api.ca_path().display()))
            .arg(format!("--node-ip={}", self.net.gateway))
            .arg(format!("--address={}", self.net.gateway))
            .arg(format!("--port={port}"))
            .args(["--read-only-port=0", "--healthz-port=0"])
            .arg("--container-runtime=remote")
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                self.containerd_socket().display()
            ))
            .args(["--cgroup-driver=cgroupfs", "--cgroups-per-qos=true"])
            .arg(format!("--cgroup-root=/ma-{}", self.id))
            .arg(format!("--root-dir={}", root.display()))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("kubelet-pki").display()
            ))
            .arg(format!(
                "--volume-plugin-dir={}",
                self.dir.join("kubelet-plugins").display()
            ))
            .arg(format!("--pod-infra-container-image={PAUSE_IMAGE}"))
            .args([
                "--fail-swap-on=false",
                "--authorization-mode=AlwaysAllow",
                "--anonymous-auth=false",
                "--authentication-token-webhook=false",
                "--resolv-conf=/etc/resolv.conf",
                // No evictions or image GC on a shared test machine's disk.
                "--eviction-hard=",
                "--image-gc-high-threshold=100",
                "--enforce-node-allocatable=",
                "--sync-frequency=5s",
                "--node-status-update-frequency=5s",
                "--serialize-image-pulls=false",
                "--v=1",
            ]);
        let log = self.dir.join("kubelet.log");
        self.kubelet = Some(spawn_in(cmd, self.cgroups.runtime.as_deref(), &log)?);
        Ok(())
    }

    fn wait_node_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let node = self.node_name();
        let jsonpath = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
        loop {
            for (name, child) in [
                ("kubelet", &mut self.kubelet),
                ("kube-controller-manager", &mut self.controller_manager),
                ("kube-scheduler", &mut self.scheduler),
                ("containerd", &mut self.containerd),
            ] {
                if let Some(Ok(Some(st))) = child.as_mut().map(|c| c.try_wait()) {
                    *child = None;
                    bail!(
                        "{name} exited ({st}):\n{}",
                        tail(&self.dir.join(format!("{name}.log")))
                    );
                }
            }
            if let Ok(s) = self.kubectl(&["get", "node", &node, "-o", jsonpath])
                && s.trim() == "True"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {node} not Ready within {timeout:?}; kubelet log:\n{}",
                    tail(&self.dir.join("kubelet.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The node's bpffs (mounted for the run; what the chart's `hostPaths.bpffs` should be).
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// The control plane (admin kubeconfig, CA, tokens).
    pub fn api(&self) -> &KubeApi {
        self.api
            .as_ref()
            .expect("the API server of a started cluster")
    }

    /// The control plane, to stop and start the API server (an outage).
    pub fn api_mut(&mut self) -> &mut KubeApi {
        self.api
            .as_mut()
            .expect("the API server of a started cluster")
    }

    pub fn network(&self) -> &NodeNetwork {
        &self.net
    }

    /// The run's id (in every name the run gives).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run's folder (component logs: `<component>.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `kubectl` command with the admin kubeconfig.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.kube_dir.join("kubectl"));
        cmd.arg(format!(
            "--kubeconfig={}",
            self.api().admin_kubeconfig().display()
        ));
        cmd
    }

    /// Runs kubectl with `args`; its stdout on success, else an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(self.kubectl_command().args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies a manifest (YAML) with `kubectl apply -f -`.
    pub fn apply(&self, manifest: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = self
            .kubectl_command()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl apply")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(manifest.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl apply: {}\n{manifest}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// What to read when something on the node did not happen: pods, events, and the tails of
    /// the kubelet's and containerd's logs.
    pub fn diagnostics(&self) -> String {
        let kubectl = |args: &[&str]| {
            self.kubectl(args)
                .unwrap_or_else(|e| format!("kubectl {}: {e:#}", args.join(" ")))
        };
        format!(
            "--- pods\n{}\n--- events\n{}\n--- kubelet.log\n{}\n--- containerd.log\n{}",
            kubectl(&["get", "pods", "-A", "-o", "wide"]),
            kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"]),
            tail(&self.dir.join("kubelet.log")),
            tail(&self.dir.join("containerd.log")),
        )
    }

    /// The kubelet's version string (`Kubernetes v1.20.2`).
    pub fn kubelet_version(&self) -> anyhow::Result<String> {
        let out = run(Command::new(self.kube_dir.join("kubelet")).arg("--version"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn teardown(&mut self) {
        // Controllers first (nothing recreates what goes), then the pods through the kubelet, so
        // CNI DEL and unmounts run as they would on a node; then whatever is left is killed and
        // removed by hand.
        stop(&mut self.controller_manager);
        stop(&mut self.scheduler);
        if self.kubelet.is_some() && self.api.is_some() {
            let _ = self.kubectl(&[
                "delete",
                "pods",
                "--all",
                "--all-namespaces",
                "--grace-period=1",
                "--wait=true",
                "--timeout=30s",
            ]);
        }
        stop(&mut self.kubelet);
        // Containers: every task of the CRI namespace, then containerd.
        if self.containerd.is_some()
            && let Ok(tasks) = self.ctr(&["tasks", "ls", "-q"])
        {
            for t in tasks.lines().filter(|t| !t.is_empty()) {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", t]);
            }
        }
        stop(&mut self.containerd);
        if let Some(rt) = &self.cgroups.runtime
            && let Err(e) = cgroup::kill_all(rt, Duration::from_secs(10))
        {
            eprintln!("meshaccel-e2e cluster teardown: {e:#}");
        }
        if let Some(v2) = &self.cgroups.v2_root {
            let _ = cgroup::kill_all(v2, Duration::from_secs(10));
        }
        for root in &self.cgroups.v1_roots {
            kill_v1_tree(root);
        }
        // Pod network namespaces pinned during the run (containerd names them cni-<uuid>).
        for name in pinned_netns().difference(&self.netns_before) {
            if name.starts_with("cni-") {
                let pin = Path::new(NETNS_DIR).join(name);
                umount(&pin);
                let _ = fs::remove_file(&pin);
            }
        }
        for m in mounts_below(&self.dir) {
            umount(&m);
        }
        for root in self
            .cgroups
            .v1_roots
            .iter()
            .chain(&self.cgroups.v2_root)
            .chain(&self.cgroups.runtime)
        {
            remove_tree(root);
        }
        if let Ok(d) = fs::read_dir(CNI_CACHE) {
            let prefix = format!("{}-", self.net.network);
            for e in d.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        for d in &self.new_host_dirs {
            let mut dirs = Vec::new();
            walk(d, &mut |p| dirs.push(p.to_path_buf()));
            dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for p in dirs {
                let _ = fs::remove_dir(p); // only empty ones go
            }
        }
        if let Some(rule) = self.net.dnat.take() {
            let mut args = vec!["-t".to_string(), "nat".into(), "-D".into()];
            args.extend(rule);
            if let Err(e) = run(Command::new("iptables").args(&args)) {
                eprintln!("meshaccel-e2e cluster teardown: {e:#}");
            }
        }
        self.api = None; // etcd and the API server stop, their folder goes
        if self.net.bridge_up {
            let _ = run(Command::new("ip").args(["link", "del", &self.net.bridge]));
            self.net.bridge_up = false;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!(
                "meshaccel-e2e cluster teardown: removing {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// SIGKILLs every process in a cgroup v1 tree (no cgroup.kill in v1) until it is empty.
fn kill_v1_tree(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids = Vec::new();
        walk(root, &mut |dir| {
            pids.extend(cgroup::procs(dir).unwrap_or_default());
        });
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: plain syscall; the pid is in a cgroup of this run.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Calls `f` on `dir` and every cgroup below it.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    f(dir);
    if let Ok(d) = fs::read_dir(dir) {
        for e in d.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), f);
            }
        }
    }
}

/// rmdir of a cgroup tree, children first.
fn remove_tree(root: &Path) {
    let mut dirs = Vec::new();
    walk(root, &mut |d| dirs.push(d.to_path_buf()));
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for d in dirs {
        if let Err(e) = cgroup::remove(&d) {
            eprintln!("meshaccel-e2e cluster teardown: {e:#}");
        }
    }
}

/// A third octet `n` whose `10.213.n.0/24` and `10.214.n.0/24` no route of this host uses.
fn pick_subnet_octet() -> anyhow::Result<u8> {
    let routes = run(Command::new("ip").args(["-4", "route", "show", "table", "all"]))?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    for _ in 0..64 {
        let n = (random_u32()? % 250) as u8 + 2;
        if !routes.contains(&format!("10.213.{n}.")) && !routes.contains(&format!("10.214.{n}.")) {
            return Ok(n);
        }
    }
    bail!("no free 10.213.x.0/24 + 10.214.x.0/24 pair in this host's routes")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::KUBE_VERSION;

    #[test]
    fn the_pause_image_is_of_the_kubernetes_version() {
        assert!(PAUSE_IMAGE.ends_with(&format!(":{KUBE_VERSION}")));
    }

    #[test]
    fn dnat_rule_targets_the_api_server_on_the_gateway() {
        let net = NodeNetwork {
            bridge: "makabc123".into(),
            network: "ma-abc123".into(),
            pod_subnet: (Ipv4Addr::new(10, 213, 7, 0), 24),
            gateway: Ipv4Addr::new(10, 213, 7, 1),
            service_cidr: (Ipv4Addr::new(10, 214, 7, 0), 24),
            dnat: None,
            bridge_up: false,
        };
        let rule = net.dnat_rule(Ipv4Addr::new(10, 214, 7, 1), 6443, "ma-abc123");
        let joined = rule.join(" ");
        assert!(joined.starts_with("PREROUTING -d 10.214.7.1/32 -p tcp --dport 443"));
        assert!(joined.ends_with("--to-destination 10.213.7.1:6443"));
        assert!(joined.contains("--comment ma-abc123"));
    }
}
