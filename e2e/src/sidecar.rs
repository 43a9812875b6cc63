//! The local mesh with real Envoy sidecars: one call starts N pods, each with Istio's capture
//! rules and an Envoy 1.40 (UID 1337) configured as istiod configures a sidecar, with mTLS between
//! sidecars (a CA of the run); apps are started in pods afterwards. Dropping it stops everything.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    APP_UID, Mesh, PROXY_UID, Pod,
    ads::{AdsOptions, AdsServer, Resources},
    envoy::{self, Pki, SidecarSpec},
    fixtures_dir, wait_ready, workspace_bin,
};

/// Istio's proxy admin port.
pub const ADMIN_PORT: u16 = 15000;

/// One pod of the mesh.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    /// With Istio's iptables rules and an Envoy sidecar; without: a plain pod outside the mesh.
    pub sidecar: bool,
    /// Ports its app listens on (the sidecar's inbound ports; the other sidecars' upstreams).
    pub ports: Vec<u16>,
}

impl PodSpec {
    pub fn mesh(name: &str, ports: &[u16]) -> Self {
        Self {
            name: name.into(),
            sidecar: true,
            ports: ports.into(),
        }
    }
    pub fn plain(name: &str, ports: &[u16]) -> Self {
        Self {
            name: name.into(),
            sidecar: false,
            ports: ports.into(),
        }
    }
}

struct Sidecar {
    spec: SidecarSpec,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Where the pods' capture rules come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// Istio's real golden (`iptables/istio-cni-sidecar/basic.txt.golden` of the shared fixtures),
    /// applied unmodified: what tests use.
    IstioGolden,
    /// meshaccel's own rendering of the same rules (`istio_integration::capture`, proven equal to
    /// the golden by its tests): what the demo uses, so it needs no fixtures.
    Generated,
}

/// Where the sidecars' listeners and clusters come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnvoyConfig {
    /// Static resources in the bootstrap.
    #[default]
    Static,
    /// Over ADS from a test ADS server of the mesh ([`SidecarMesh::ads`]), as from istiod:
    /// listeners and clusters per sidecar (node id), outbound endpoints over EDS with their
    /// `tlsMode: istio` metadata. Nodes the server does not know (the agent) get the first
    /// sidecar's resources. Secrets stay static.
    Ads,
}

/// A running local mesh with Envoy sidecars.
pub struct SidecarMesh {
    /// Declared first: dropped first, so processes die before the files go.
    pub mesh: Mesh,
    /// The ADS server of [`EnvoyConfig::Ads`] (dropped after the Envoys).
    ads: Option<AdsServer>,
    pods: Vec<(Pod, Option<Sidecar>)>,
    envoy: PathBuf,
    base_id: u32,
    restarts: u32,
    /// Certificates, configs and logs of the run (readable by UID 1337).
    dir: tempfile::TempDir,
}

impl SidecarMesh {
    /// Starts the pods (Istio's golden capture rules) and their sidecars; returns once every
    /// Envoy is LIVE.
    pub fn start(specs: &[PodSpec]) -> anyhow::Result<SidecarMesh> {
        Self::start_with(specs, Rules::IstioGolden)
    }

    pub fn start_with(specs: &[PodSpec], rules: Rules) -> anyhow::Result<SidecarMesh> {
        Self::start_opts(specs, rules, EnvoyConfig::Static)
    }

    /// Starts the pods with `rules`, their sidecars configured as `config` says.
    pub fn start_opts(
        specs: &[PodSpec],
        rules: Rules,
        config: EnvoyConfig,
    ) -> anyhow::Result<SidecarMesh> {
        let envoy = envoy::envoy_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("meshaccel-mesh-")
            .tempdir()?;
        // UID 1337 reads the configs and certificates in here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let pki = Pki::new(dir.path()).context("creating the mesh CA")?;
        let mut mesh = Mesh::new()?;
        let golden = match rules {
            Rules::IstioGolden => {
                fixtures_dir().join("iptables/istio-cni-sidecar/basic.txt.golden")
            }
            Rules::Generated => {
                let path = dir.path().join("istio-capture.rules");
                std::fs::write(
                    &path,
                    istio_integration::capture::CaptureConfig::default().render_nat(),
                )?;
                path
            }
        };
        let mut pods = Vec::new();
        for s in specs {
            let pod = mesh.add_pod(&s.name, s.sidecar.then_some(golden.as_path()))?;
            pods.push(pod);
        }
        // Every sidecar may call every port of every other pod with a sidecar (mTLS); anything
        // else leaves through the PassthroughCluster in plaintext, as in Istio.
        let ads = match config {
            EnvoyConfig::Static => None,
            EnvoyConfig::Ads => Some(
                AdsServer::start(AdsOptions {
                    uds: Some(dir.path().join("xds.sock")),
                    ..Default::default()
                })
                .context("starting the ADS server")?,
            ),
        };
        let mut out = SidecarMesh {
            mesh,
            ads,
            pods: Vec::new(),
            envoy,
            base_id: std::process::id() % 10_000 * 100,
            restarts: 0,
            dir,
        };
        for (s, pod) in specs.iter().zip(&pods) {
            let sidecar = if s.sidecar {
                let upstreams = specs
                    .iter()
                    .zip(&pods)
                    .filter(|(o, p)| o.sidecar && p.name != pod.name)
                    .flat_map(|(o, p)| o.ports.iter().map(|port| (p.name.clone(), p.ip, *port)))
                    .collect();
                let spec = SidecarSpec {
                    pod_name: pod.name.clone(),
                    pod_ip: pod.ip,
                    inbound_ports: s.ports.clone(),
                    upstreams,
                    admin_port: ADMIN_PORT,
                };
                let certs = pki.issue(&pod.name)?;
                let config = match &out.ads {
                    None => envoy::write_bootstrap(out.dir.path(), &spec, &certs)?,
                    Some(ads) => {
                        let (clusters, endpoints) = envoy::eds_split(envoy::clusters(&spec));
                        let res =
                            Resources::from_json(&envoy::listeners(&spec), &clusters, &endpoints)
                                .with_context(|| format!("{}'s xDS resources", pod.name))?;
                        let first = ads.resources("").listeners.is_empty();
                        ads.edit(|e| {
                            if first {
                                *e.default = res.clone();
                            }
                            e.per_node.insert(spec.node_id(), res);
                        });
                        let uds = ads.uds().expect("the mesh's ADS server has a socket");
                        envoy::write_bootstrap_ads(out.dir.path(), &spec, &certs, uds)?
                    }
                };
                let log = out.dir.path().join(format!("envoy-{}.log", pod.name));
                Some(Sidecar {
                    spec,
                    config,
                    log,
                    child: None,
                })
            } else {
                None
            };
            out.pods.push((pod.clone(), sidecar));
        }
        for name in specs.iter().filter(|s| s.sidecar).map(|s| s.name.clone()) {
            out.start_envoy(&name)?;
        }
        Ok(out)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The ADS server ([`EnvoyConfig::Ads`]).
    pub fn ads(&self) -> Option<&AdsServer> {
        self.ads.as_ref()
    }

    pub fn ads_mut(&mut self) -> Option<&mut AdsServer> {
        self.ads.as_mut()
    }

    /// The node id of a pod's sidecar (what it presents to the ADS server).
    pub fn node_id(&self, name: &str) -> String {
        self.pods
            .iter()
            .find(|(p, _)| p.name == name)
            .and_then(|(_, s)| s.as_ref())
            .map(|s| s.spec.node_id())
            .unwrap_or_else(|| panic!("no sidecar in pod {name}"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        &self
            .pods
            .iter()
            .find(|(p, _)| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
            .0
    }

    fn sidecar(&mut self, name: &str) -> anyhow::Result<(Pod, &mut Sidecar)> {
        let (pod, sc) = self
            .pods
            .iter_mut()
            .find(|(p, _)| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let pod = pod.clone();
        Ok((
            pod,
            sc.as_mut()
                .with_context(|| format!("pod {name} has no sidecar"))?,
        ))
    }

    fn start_envoy(&mut self, name: &str) -> anyhow::Result<()> {
        let base_id = self.base_id + self.restarts;
        self.restarts += 1;
        let envoy = self.envoy.clone();
        let dir = self.dir.path().to_path_buf();
        let (pod, sc) = self.sidecar(name)?;
        envoy::create_log_file(&sc.log, PROXY_UID)?;
        let mut cmd = Command::new(&envoy);
        cmd.args(envoy::envoy_args(&sc.config, base_id, &sc.log))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join(format!("envoy-{name}.stderr")))?);
        let log = sc.log.clone();
        let admin = sc.spec.admin_port;
        let mut child = self.mesh.spawn_cmd(&pod, Some(PROXY_UID), cmd)?;
        wait_live(&pod, admin, &log, &mut child)?;
        self.sidecar(name)?.1.child = Some(child);
        Ok(())
    }

    /// Kills the pod's Envoy (SIGKILL, as a crash) and starts a new one with the same config.
    pub fn restart_envoy(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(mut c) = self.sidecar(name)?.1.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start_envoy(name)
    }

    /// Envoy's stats of a pod (admin `/stats`), lines containing `filter`.
    pub fn envoy_stats(&self, name: &str, filter: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let pod = self.pod(name);
        let out = pod.netns_exec(
            "curl",
            &[
                "-s",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{ADMIN_PORT}/stats"),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(filter))
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect())
    }

    /// Starts a server app (the e2e tool with `args`, e.g. `http-server --listen …`) in a pod as
    /// [`APP_UID`] and waits until it listens. The mesh stops and reaps it at teardown.
    pub fn serve(&mut self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let pod = self.pod(name).clone();
        let mut child = self.mesh.spawn(
            &pod,
            Some(APP_UID),
            &workspace_bin("meshaccel-e2e-tool"),
            args,
        )?;
        let ready = wait_ready(&mut child);
        drop(child); // tracked (pidfd) by the mesh, which kills and reaps it
        ready
    }

    /// Starts a client app (the e2e tool with `args`) in a pod as [`APP_UID`].
    pub fn app(&mut self, name: &str, args: &[&str]) -> anyhow::Result<Child> {
        let pod = self.pod(name).clone();
        let mut child = self.mesh.spawn(
            &pod,
            Some(APP_UID),
            &workspace_bin("meshaccel-e2e-tool"),
            args,
        )?;
        if args
            .first()
            .is_some_and(|a| ["sink", "echo", "http-server"].contains(a))
        {
            wait_ready(&mut child)?;
        }
        Ok(child)
    }
}

/// Waits until Envoy's admin says LIVE (30 s), failing early with its log if it exits.
pub fn wait_live(pod: &Pod, admin: u16, log: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = pod
            .netns_command("curl")
            .args([
                "-s",
                "--max-time",
                "2",
                &format!("http://127.0.0.1:{admin}/ready"),
            ])
            .output()
            .context("curl (scripts/env.sh installs it)")?;
        if String::from_utf8_lossy(&out.stdout).trim() == "LIVE" {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "envoy in pod {} exited ({status}):\n{}",
                pod.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "envoy in pod {} not LIVE within 30 s:\n{}",
                pod.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
