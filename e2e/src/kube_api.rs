//! A real Kubernetes control plane for tests: etcd 3.4 and kube-apiserver v1.20.2 on loopback.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use meshaccel_e2e::kube_api::{AGENT_CLUSTER_ROLE_RULES, KubeApi};
//! let mut api = KubeApi::start()?; // etcd + apiserver of this run, ready
//! let admin = api.admin_kubeconfig().to_path_buf(); // system:masters
//! api.create_cluster_role("meshaccel-agent", AGENT_CLUSTER_ROLE_RULES)?;
//! let agent = api.kubeconfig_for_cluster_role("meshaccel-agent")?; // a token bound to it only
//! api.stop_apiserver(); // etcd keeps the data
//! api.start_apiserver()?; // same address, same tokens
//! # Ok(()) }
//! // Dropped (also while a test panics): both processes killed, the run's folder removed.
//! ```
//!
//! - Binaries: `$MESHACCEL_KUBE_APISERVER`, else `scripts/install-kube.sh`'s cache path
//!   (`$MESHACCEL_CACHE` or /var/cache/meshaccel, `kubernetes-v1.20.2/kube-apiserver`);
//!   `$MESHACCEL_ETCD`, else `etcd` on PATH (Debian's `etcd-server`). Missing ones are a clear
//!   error naming the install script.
//! - Everything is run-unique: free loopback ports picked at start, a temp folder
//!   (`/tmp/meshaccel-kube-XXXXXX`) with etcd's data, a CA and serving certificate of the run
//!   (kubeconfigs verify the server), the service-account signing key, the static token file
//!   and the kubeconfigs.
//! - Authentication: static tokens only (`--token-auth-file`): an admin in `system:masters`, and
//!   a pool of plain users that [`KubeApi::kubeconfig_for_cluster_role`] binds to one ClusterRole
//!   each. Authorization: `--authorization-mode=RBAC`. Admission: the `ServiceAccount` plugin is
//!   off (no controller-manager creates tokens), so pods and DaemonSet specs need no account.
//! - There is no scheduler, controller-manager or kubelet: objects are stored as written. Pods
//!   meant for a node carry `spec.nodeName`; their `status` is set through the `status`
//!   subresource ([`KubeApi::set_pod_running`]); deleting a pod bound to a node needs
//!   `gracePeriodSeconds: 0` (no kubelet confirms a graceful deletion).
use std::{
    fs,
    future::Future,
    io::Write as _,
    net::{Ipv4Addr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{
    core::v1::Pod,
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// The version `scripts/install-kube.sh` builds.
pub const KUBE_VERSION: &str = "v1.20.2";

/// The rules of the ClusterRole the meshaccel agent needs, and nothing more (the Helm chart's
/// ClusterRole must have exactly these): read and watch pods and namespaces, post Events.
pub const AGENT_CLUSTER_ROLE_RULES: &str = r#"- apiGroups: [""]
  resources: ["pods", "namespaces"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
"#;

/// How many plain users the token file provides for [`KubeApi::kubeconfig_for_cluster_role`].
const USER_POOL: usize = 16;

/// Where and how the API server runs. [`Default`]: on 127.0.0.1, no service-account admission
/// (nothing creates accounts or tokens), as the controller tests want it.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// Bind and advertise address (also in the serving certificate). A cluster with pods needs
    /// one the pods can reach (the `kubernetes` Service's endpoint).
    pub address: Ipv4Addr,
    /// `--service-cluster-ip-range`; its first address (the `kubernetes` Service) is in the
    /// serving certificate too, for in-cluster clients.
    pub service_cidr: (Ipv4Addr, u8),
    /// The ServiceAccount admission plugin on: pods get their account's token mounted (needs a
    /// controller-manager with the run's signing key, see [`KubeApi::sa_key_path`]).
    pub service_accounts: bool,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            address: Ipv4Addr::LOCALHOST,
            service_cidr: (Ipv4Addr::new(10, 0, 0, 0), 24),
            service_accounts: false,
        }
    }
}

impl ApiOptions {
    /// The `kubernetes` Service's cluster IP: the range's first address.
    pub fn kubernetes_service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.service_cidr.0) + 1)
    }
}

/// A running etcd + kube-apiserver of one test run. See the module docs.
pub struct KubeApi {
    options: ApiOptions,
    dir: tempfile::TempDir,
    apiserver_bin: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    port: u16,
    etcd_port: u16,
    admin_token: String,
    admin_kubeconfig: PathBuf,
    ca_pem: String,
    /// (user, token) of the pool; `next_user` are taken.
    users: Vec<(String, String)>,
    next_user: usize,
    run_id: String,
}

fn free_port(address: Ipv4Addr) -> anyhow::Result<u16> {
    Ok(TcpListener::bind((address, 0))
        .with_context(|| format!("binding a port on {address}"))?
        .local_addr()?
        .port())
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; bytes];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The kube-apiserver binary: `$MESHACCEL_KUBE_APISERVER`, else install-kube.sh's cache path.
pub fn apiserver_binary() -> anyhow::Result<PathBuf> {
    let p = match std::env::var_os("MESHACCEL_KUBE_APISERVER") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("MESHACCEL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/meshaccel"));
            cache.join(format!("kubernetes-{KUBE_VERSION}/kube-apiserver"))
        }
    };
    if !p.is_file() {
        bail!(
            "kube-apiserver not found at {}: run scripts/install-kube.sh (or set MESHACCEL_KUBE_APISERVER)",
            p.display()
        );
    }
    Ok(p)
}

fn etcd_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESHACCEL_ETCD") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "etcd not found on PATH: run scripts/install-kube.sh (Debian etcd-server) or set MESHACCEL_ETCD"
    )
}

/// A child that dies with the thread that started it (a killed test leaves nothing behind).
fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: prctl in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// SIGTERM, then SIGKILL after 10 s; reaped.
pub(crate) fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The last lines of a log file (for errors that quote it).
pub(crate) fn tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Runs a future to completion on a fresh runtime on a helper thread (usable from sync tests
/// and from inside another runtime alike).
pub fn block_on<F>(f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f)
        })
        .join()
        .expect("block_on thread panicked")
    })
}

impl KubeApi {
    /// Starts etcd and kube-apiserver and waits until the API server is ready (RBAC bootstrap
    /// roles included). Takes 5-15 s.
    pub fn start() -> anyhow::Result<KubeApi> {
        Self::start_with(ApiOptions::default())
    }

    /// [`KubeApi::start`] with the API server where and as `options` say.
    pub fn start_with(options: ApiOptions) -> anyhow::Result<KubeApi> {
        let apiserver_bin = apiserver_binary()?;
        let etcd_bin = etcd_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("meshaccel-kube-")
            .tempdir()
            .context("creating the run folder")?;
        let d = dir.path();
        let run_id = random_hex(3)?;

        // PKI of the run: a CA, the serving certificate (127.0.0.1, localhost), the
        // service-account signing key (required by 1.20).
        let mut ca_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("meshaccel-kube-{run_id} CA"));
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)
            .context("self-signing the CA")?;
        let mut srv = CertificateParams::default();
        srv.distinguished_name = DistinguishedName::new();
        srv.distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        srv.subject_alt_names = vec![
            SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
            SanType::IpAddress(options.address.into()),
            SanType::IpAddress(options.kubernetes_service_ip().into()),
            SanType::DnsName("localhost".try_into()?),
            SanType::DnsName("kubernetes.default.svc".try_into()?),
        ];
        srv.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let srv_key = KeyPair::generate()?;
        let srv_cert = srv
            .signed_by(&srv_key, &ca)
            .context("signing the serving cert")?;
        let sa_key = KeyPair::generate()?;
        fs::write(d.join("ca.crt"), ca.pem())?;
        fs::write(d.join("apiserver.crt"), srv_cert.pem())?;
        fs::write(d.join("apiserver.key"), srv_key.serialize_pem())?;
        fs::write(d.join("sa.key"), sa_key.serialize_pem())?;
        fs::write(d.join("sa.pub"), sa_key.public_key_pem())?;
        // The API server's client certificate towards kubelets (logs, exec), which trust the
        // run's CA (`--client-ca-file`).
        let mut kc = CertificateParams::default();
        kc.distinguished_name = DistinguishedName::new();
        kc.distinguished_name
            .push(DnType::CommonName, "kube-apiserver-kubelet-client");
        kc.distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        kc.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        kc.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let kc_key = KeyPair::generate()?;
        let kc_cert = kc
            .signed_by(&kc_key, &ca)
            .context("signing the kubelet client cert")?;
        fs::write(d.join("kubelet-client.crt"), kc_cert.pem())?;
        fs::write(d.join("kubelet-client.key"), kc_key.serialize_pem())?;

        let admin_token = random_hex(16)?;
        let mut tokens =
            format!("{admin_token},meshaccel-admin,meshaccel-admin,\"system:masters\"\n");
        let mut users = Vec::new();
        for i in 0..USER_POOL {
            let (user, token) = (format!("meshaccel-user-{i}"), random_hex(16)?);
            tokens += &format!("{token},{user},{user}\n");
            users.push((user, token));
        }
        fs::write(d.join("tokens.csv"), tokens)?;

        let mut api = KubeApi {
            options,
            apiserver_bin,
            etcd: None,
            apiserver: None,
            port: 0,
            etcd_port: 0,
            admin_kubeconfig: d.join("admin.kubeconfig"),
            ca_pem: ca.pem(),
            admin_token,
            users,
            next_user: 0,
            run_id,
            dir,
        };

        // etcd on two free ports; retried if a port was taken in between.
        let mut last = String::new();
        for _ in 0..3 {
            let (client, peer) = (
                free_port(Ipv4Addr::LOCALHOST)?,
                free_port(Ipv4Addr::LOCALHOST)?,
            );
            let data = api.dir.path().join(format!("etcd-{client}"));
            let mut cmd = Command::new(&etcd_bin);
            let c = format!("http://127.0.0.1:{client}");
            let p = format!("http://127.0.0.1:{peer}");
            cmd.args(["--name", "meshaccel"])
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                .args([
                    "--listen-peer-urls",
                    &p,
                    "--initial-advertise-peer-urls",
                    &p,
                ])
                .args(["--initial-cluster", &format!("meshaccel={p}")])
                .args(["--log-level", "warn", "--logger", "zap"]);
            let log = api.dir.path().join("etcd.log");
            api.etcd = Some(spawn_logged(cmd, &log)?);
            api.etcd_port = client;
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut up = false;
            while Instant::now() < deadline {
                if std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, client)).is_ok() {
                    up = true;
                    break;
                }
                if let Some(Ok(Some(st))) = api.etcd.as_mut().map(|c| c.try_wait()) {
                    last = format!("etcd exited ({st}):\n{}", tail(&log));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if up {
                break;
            }
            stop(&mut api.etcd);
        }
        if api.etcd.is_none() {
            bail!("etcd did not start: {last}");
        }

        for attempt in 0..3 {
            api.port = free_port(api.options.address)?;
            match api.start_apiserver() {
                Ok(()) => break,
                Err(e) if attempt < 2 => {
                    eprintln!(
                        "kube-apiserver did not start on port {}, retrying: {e:#}",
                        api.port
                    );
                }
                Err(e) => return Err(e),
            }
        }
        api.write_kubeconfig(
            &api.admin_kubeconfig,
            "meshaccel-admin",
            &api.admin_token.clone(),
        )?;
        Ok(api)
    }

    /// `https://<address>:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.options.address, self.port)
    }

    pub fn options(&self) -> &ApiOptions {
        &self.options
    }

    /// The secure port (also the `kubernetes` Service's endpoint port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The service-account signing key (PEM), for a controller-manager's token controller.
    pub fn sa_key_path(&self) -> PathBuf {
        self.dir.path().join("sa.key")
    }

    /// A kubeconfig for the admin (`system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The run's CA certificate (PEM) that signed the API server's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The run's folder (logs: `apiserver.log`, `etcd.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A short random id of this run (for names of cluster-scoped objects).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// A client with the admin kubeconfig. Needs a tokio runtime (e.g. inside [`block_on`]).
    pub async fn admin_client(&self) -> anyhow::Result<Client> {
        client_for(&self.admin_kubeconfig).await
    }

    fn write_kubeconfig(&self, path: &Path, user: &str, token: &str) -> anyhow::Result<()> {
        // kubeconfig wants base64 of the PEM text.
        let ca_b64 = base64(self.ca_pem.as_bytes());
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: meshaccel\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca_b64}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: {user}\n  context:\n    cluster: meshaccel\n    user: {user}\ncurrent-context: {user}\n",
            url = self.url()
        );
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Starts the API server (again, on the same port with the same tokens) and waits until it
    /// is ready.
    pub fn start_apiserver(&mut self) -> anyhow::Result<()> {
        if self.apiserver.is_some() {
            bail!("the API server is already running");
        }
        let d = self.dir.path();
        let mut cmd = Command::new(&self.apiserver_bin);
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.etcd_port
        ))
        .arg(format!("--bind-address={}", self.options.address))
        .arg(format!("--advertise-address={}", self.options.address))
        .arg(format!("--secure-port={}", self.port))
        .arg("--insecure-port=0")
        .arg(format!("--cert-dir={}", d.join("certs").display()))
        .arg(format!(
            "--tls-cert-file={}",
            d.join("apiserver.crt").display()
        ))
        .arg(format!(
            "--tls-private-key-file={}",
            d.join("apiserver.key").display()
        ))
        .arg(format!(
            "--token-auth-file={}",
            d.join("tokens.csv").display()
        ))
        .arg("--authorization-mode=RBAC")
        .arg(format!(
            "--kubelet-client-certificate={}",
            d.join("kubelet-client.crt").display()
        ))
        .arg(format!(
            "--kubelet-client-key={}",
            d.join("kubelet-client.key").display()
        ))
        // Node names are not in DNS here: reach kubelets at their InternalIP.
        .arg("--kubelet-preferred-address-types=InternalIP")
        .arg(if self.options.service_accounts {
            "--enable-admission-plugins=ServiceAccount"
        } else {
            "--disable-admission-plugins=ServiceAccount"
        })
        .arg(format!(
            "--service-account-key-file={}",
            d.join("sa.pub").display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            d.join("sa.key").display()
        ))
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!(
            "--service-cluster-ip-range={}/{}",
            self.options.service_cidr.0, self.options.service_cidr.1
        ))
        .arg("--allow-privileged=true")
        .arg("--profiling=false")
        .arg("--v=1");
        let log = d.join("apiserver.log");
        self.apiserver = Some(spawn_logged(cmd, &log)?);
        let url = format!("{}/readyz", self.url());
        let ca = self.ca_path();
        let token = self.admin_token.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(Ok(Some(st))) = self.apiserver.as_mut().map(|c| c.try_wait()) {
                self.apiserver = None;
                bail!("kube-apiserver exited ({st}):\n{}", tail(&log));
            }
            let out = Command::new("curl")
                .args(["-s", "--max-time", "2", "--cacert"])
                .arg(&ca)
                .args(["-H", &format!("Authorization: Bearer {token}"), &url])
                .output()
                .context("running curl (Debian package curl)")?;
            if out.status.success() && out.stdout == b"ok" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        stop(&mut self.apiserver);
        bail!("kube-apiserver not ready within 60 s:\n{}", tail(&log))
    }

    /// Stops the API server (SIGTERM; etcd and its data stay).
    pub fn stop_apiserver(&mut self) {
        stop(&mut self.apiserver);
    }

    /// Creates a ClusterRole `name` with `rules` (YAML list of PolicyRules, as in a ClusterRole
    /// manifest's `rules:`).
    pub fn create_cluster_role(&self, name: &str, rules_yaml: &str) -> anyhow::Result<()> {
        let rules: Vec<PolicyRule> =
            serde_yaml::from_str(rules_yaml).context("parsing the ClusterRole rules")?;
        let role = ClusterRole {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            rules: Some(rules),
            ..Default::default()
        };
        block_on(async {
            let api: Api<ClusterRole> = Api::all(self.admin_client().await?);
            api.create(&PostParams::default(), &role)
                .await
                .with_context(|| format!("creating ClusterRole {name}"))?;
            anyhow::Ok(())
        })
    }

    /// A kubeconfig for a fresh user whose only permissions come from a ClusterRoleBinding to
    /// `cluster_role` (plus what every authenticated user has: discovery, /version, self
    /// reviews). At most 16 per run.
    pub fn kubeconfig_for_cluster_role(&mut self, cluster_role: &str) -> anyhow::Result<PathBuf> {
        let Some((user, token)) = self.users.get(self.next_user).cloned() else {
            bail!("all {USER_POOL} users of this run are taken");
        };
        self.next_user += 1;
        let binding = ClusterRoleBinding {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("{user}-{cluster_role}")),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: cluster_role.into(),
            },
            subjects: Some(vec![Subject {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "User".into(),
                name: user.clone(),
                ..Default::default()
            }]),
        };
        block_on(async {
            let api: Api<ClusterRoleBinding> = Api::all(self.admin_client().await?);
            api.create(&PostParams::default(), &binding)
                .await
                .with_context(|| format!("binding {user} to ClusterRole {cluster_role}"))?;
            anyhow::Ok(())
        })?;
        let path = self.dir.path().join(format!("{user}.kubeconfig"));
        self.write_kubeconfig(&path, &user, &token)?;
        Ok(path)
    }

    /// Sets a pod's status as a kubelet would once its sandbox is up: phase Running, `podIP`.
    pub async fn set_pod_running(
        client: &Client,
        namespace: &str,
        name: &str,
        ip: &str,
    ) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let patch = serde_json::json!({
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        });
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching status of pod {namespace}/{name}"))?;
        Ok(())
    }
}

/// A client for a kubeconfig file. Needs a tokio runtime.
pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        stop(&mut self.apiserver);
        stop(&mut self.etcd);
        // The TempDir removes the run's folder.
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(i.as_bytes()), o);
        }
    }
}
