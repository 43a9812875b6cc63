//! The Helm chart (charts/meshaccel) and the agent image recipe (accelerator/Dockerfile):
//!
//! - `helm lint` and `helm template` with the default values and with ci/ci-values.yaml; the
//!   rendered objects are checked for what the chart promises: no privileged container, only
//!   CAP_BPF/NET_ADMIN/SYS_ADMIN/PERFMON, only the three host paths, no hostNetwork/hostPID, the
//!   agent's minimal ClusterRole, `meshaccel agent --node-name=$(NODE_NAME)` from the downward
//!   API, every `MESHACCEL_*` variable one the binary reads, the pre-delete uninstall hook;
//! - the Dockerfile's structure (multi-stage, the binary where the entrypoint expects it);
//! - `helm install` into a real kube-apiserver (e2e/src/kube_api.rs): the DaemonSet, RBAC and
//!   ServiceAccount exist as rendered; `helm uninstall` (its pre-delete hook Job completed by the
//!   test, as there is no Job controller) removes them.
//!
//! helm: `$MESHACCEL_HELM`, else scripts/install-helm.sh's cache (scripts/test.sh installs it).
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    batch::v1::Job,
    core::v1::{Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::api::{Api, Patch, PatchParams};
use meshaccel_e2e::{
    kube_api::{self, AGENT_CLUSTER_ROLE_RULES, KubeApi},
    workspace_bin,
};
use serde_json::Value;

/// `MESHACCEL_*` variables the chart sets for agent flags that do not exist yet (the opt-in
/// label key is a constant of the Kubernetes source so far). Until the flag exists the variable
/// is ignored by the agent; this list must shrink to empty, never grow silently.
const PENDING_ENV: &[&str] = &[];

const CAPS: [&str; 4] = ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

use support::helm;

fn chart() -> PathBuf {
    root().join("charts/meshaccel")
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm template` → the rendered objects as JSON.
fn template(values: Option<&Path>, namespace: &str) -> anyhow::Result<Vec<Value>> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "rel"])
        .arg(chart())
        .args(["--namespace", namespace]);
    if let Some(v) = values {
        cmd.arg("--values").arg(v);
    }
    docs(&run(&mut cmd)?)
}

/// The objects of a multi-document YAML stream (helm's output), as JSON.
fn docs(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines().chain(["---"]) {
        if line.trim_end() == "---" {
            let v: serde_yaml::Value = serde_yaml::from_str(&cur)
                .with_context(|| format!("bad YAML from helm:\n{cur}"))?;
            if !v.is_null() {
                out.push(serde_json::to_value(v)?);
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    Ok(out)
}

fn kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

fn is_hook(o: &Value) -> bool {
    o["metadata"]["annotations"]["helm.sh/hook"].is_string()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

/// Every pod template of the rendered objects: (object name, pod spec).
fn pod_specs(objs: &[Value]) -> Vec<(String, &Value)> {
    objs.iter()
        .filter(|o| o["kind"] == "DaemonSet" || o["kind"] == "Job")
        .map(|o| {
            (
                format!("{} {}", o["kind"], o["metadata"]["name"]),
                &o["spec"]["template"]["spec"],
            )
        })
        .collect()
}

/// Environment variable names the binary reads (clap's `[env: NAME=]` in every subcommand's help).
fn known_env() -> BTreeSet<String> {
    let bin = workspace_bin("meshaccel");
    let mut names = BTreeSet::new();
    for sub in ["agent", "uninstall", "status", "doctor"] {
        let help = run(Command::new(&bin).args([sub, "--help"])).expect("meshaccel --help");
        for part in help.split("[env: ").skip(1) {
            if let Some(name) = part.split(['=', ']']).next() {
                names.insert(name.to_string());
            }
        }
    }
    assert!(
        names.contains("MESHACCEL_BPFFS"),
        "could not read env names from --help"
    );
    names
}

/// What the chart promises, on one rendering.
fn check_rendering(objs: &[Value], values: &serde_yaml::Value, what: &str) {
    let known = known_env();
    let s = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().to_string();
    // RBAC: exactly the agent's rules.
    let roles = kind(objs, "ClusterRole");
    assert_eq!(roles.len(), 1, "{what}: one ClusterRole");
    let want: Value = serde_json::to_value(
        serde_yaml::from_str::<serde_yaml::Value>(AGENT_CLUSTER_ROLE_RULES).unwrap(),
    )
    .unwrap();
    assert_eq!(roles[0]["rules"], want, "{what}: ClusterRole rules");
    let sa = kind(objs, "ServiceAccount")
        .into_iter()
        .find(|o| !is_hook(o))
        .expect("a ServiceAccount");
    let binding = kind(objs, "ClusterRoleBinding");
    assert_eq!(binding.len(), 1, "{what}");
    assert_eq!(binding[0]["roleRef"]["name"], roles[0]["metadata"]["name"]);
    assert_eq!(binding[0]["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(binding[0]["subjects"][0]["kind"], "ServiceAccount");

    // Security: every pod of every object.
    for (name, spec) in pod_specs(objs) {
        assert_ne!(spec["hostNetwork"], true, "{what}: {name}: hostNetwork");
        assert_ne!(spec["hostPID"], true, "{what}: {name}: hostPID");
        assert_ne!(spec["hostIPC"], true, "{what}: {name}: hostIPC");
        let containers = spec["containers"]
            .as_array()
            .into_iter()
            .chain(spec["initContainers"].as_array())
            .flatten();
        for c in containers {
            let sc = &c["securityContext"];
            assert_eq!(
                sc["privileged"], false,
                "{what}: {name}/{}: privileged",
                c["name"]
            );
            assert_eq!(
                strs(&sc["capabilities"]["drop"]),
                ["ALL"],
                "{what}: {name}/{}",
                c["name"]
            );
            let added = strs(&sc["capabilities"]["add"]);
            assert!(
                added.iter().all(|c| CAPS.contains(&c.as_str())),
                "{what}: {name}/{}: capabilities {added:?}",
                c["name"]
            );
            if !added.is_empty() {
                // Kubernetes rejects allowPrivilegeEscalation=false with CAP_SYS_ADMIN.
                assert_ne!(sc["allowPrivilegeEscalation"], false, "{what}: {name}");
            }
            assert_eq!(
                sc["readOnlyRootFilesystem"], true,
                "{what}: {name}/{}",
                c["name"]
            );
            for e in c["env"].as_array().into_iter().flatten() {
                let n = e["name"].as_str().unwrap();
                if n.starts_with("MESHACCEL_") {
                    assert!(
                        known.contains(n) || PENDING_ENV.contains(&n),
                        "{what}: {name}/{}: the chart sets {n}, which `meshaccel` does not read (known: {known:?})",
                        c["name"]
                    );
                }
            }
        }
        // Only the three host paths.
        for v in spec["volumes"].as_array().into_iter().flatten() {
            if let Some(p) = v["hostPath"]["path"].as_str() {
                let allowed = [
                    s(&values["hostPaths"]["cgroup"]),
                    s(&values["hostPaths"]["bpffs"]),
                    s(&values["hostPaths"]["netns"]),
                ];
                assert!(
                    allowed.contains(&p.to_string()),
                    "{what}: {name}: host path {p}"
                );
            }
        }
    }

    // The agent.
    let ds = kind(objs, "DaemonSet")
        .into_iter()
        .find(|o| !is_hook(o))
        .expect("the agent DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"], "{what}");
    let agent = &pod["containers"][0];
    let mut caps = strs(&agent["securityContext"]["capabilities"]["add"]);
    caps.sort();
    let mut want_caps: Vec<String> = CAPS.iter().map(|s| s.to_string()).collect();
    want_caps.sort();
    assert_eq!(caps, want_caps, "{what}: the agent's capabilities");
    assert_eq!(
        strs(&agent["args"]),
        ["agent", "--node-name=$(NODE_NAME)"],
        "{what}"
    );
    let env: BTreeMap<String, &Value> = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e))
        .collect();
    assert_eq!(
        env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
        "{what}: node name from the downward API"
    );
    // The agent's own pod, for the Events about its node (found by `kubectl describe` by uid).
    for (var, field) in [
        ("MESHACCEL_POD_NAMESPACE", "metadata.namespace"),
        ("MESHACCEL_POD_NAME", "metadata.name"),
        ("MESHACCEL_POD_UID", "metadata.uid"),
    ] {
        assert_eq!(
            env[var]["valueFrom"]["fieldRef"]["fieldPath"], field,
            "{what}: {var} from the downward API"
        );
    }
    // The queue bound as the agent parses it: `auto`, or the number written out (YAML reads a
    // large number as a float; the template must not pass "4.194304e+06").
    let limit = env["MESHACCEL_MAX_UNREAD_BYTES"]["value"]
        .as_str()
        .unwrap_or_default();
    assert!(
        meshaccel::queue_limit::parse(limit).is_ok()
            && limit
                == match &values["dataplane"]["maxUnreadBytes"] {
                    serde_yaml::Value::Number(n) => n.to_string(),
                    v => s(v),
                },
        "{what}: MESHACCEL_MAX_UNREAD_BYTES {limit:?}"
    );
    let port = values["metrics"]["port"].as_u64().unwrap();
    assert_eq!(
        env["MESHACCEL_METRICS_ADDR"]["value"],
        format!("0.0.0.0:{port}"),
        "{what}"
    );
    assert_eq!(agent["ports"][0]["containerPort"], port, "{what}");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        env["MESHACCEL_LOG_FORMAT"]["value"],
        s(&values["log"]["format"]),
        "{what}"
    );
    assert_eq!(
        env["MESHACCEL_OPT_IN_LABEL"]["value"],
        s(&values["optInLabel"])
    );
    // A generation per install/upgrade (what `meshaccel uninstall` records as uninstalled), one
    // the binary accepts.
    let generation = env["MESHACCEL_INSTALL_GENERATION"]["value"]
        .as_str()
        .unwrap_or_default();
    assert!(
        meshaccel::install_gate::check_generation(generation).is_ok()
            && generation != meshaccel::install_gate::DEFAULT_GENERATION,
        "{what}: install generation {generation:?}"
    );
    let bpffs_dir = env["MESHACCEL_BPFFS"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let cgroup_dir = env["MESHACCEL_CGROUP"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let mounts: BTreeMap<String, &Value> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m))
        .collect();
    assert!(bpffs_dir.starts_with(mounts["bpffs"]["mountPath"].as_str().unwrap()));
    assert_eq!(mounts["cgroup"]["mountPath"], cgroup_dir.as_str());
    assert_eq!(
        mounts["cgroup"]["readOnly"], true,
        "{what}: cgroup mounted read-only"
    );
    let vols: BTreeMap<String, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(
        vols["cgroup"]["hostPath"]["path"],
        s(&values["hostPaths"]["cgroup"])
    );
    assert_eq!(
        vols["bpffs"]["hostPath"]["path"],
        s(&values["hostPaths"]["bpffs"])
    );

    // The pre-delete hook runs `meshaccel uninstall` on the agent's bpffs folder, on every node.
    let hook_ds = kind(objs, "DaemonSet")
        .into_iter()
        .find(|o| is_hook(o))
        .expect("the uninstall hook DaemonSet");
    assert_eq!(
        hook_ds["metadata"]["annotations"]["helm.sh/hook"],
        "pre-delete"
    );
    let init = &hook_ds["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(strs(&init["args"]), ["uninstall"]);
    assert!(
        init["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "MESHACCEL_BPFFS" && e["value"] == bpffs_dir.as_str()),
        "{what}: the hook uninstalls where the agent pins"
    );
    assert_eq!(
        hook_ds["spec"]["template"]["spec"]["tolerations"], pod["tolerations"],
        "{what}: the hook reaches the agent's nodes"
    );
    let job = kind(objs, "Job");
    assert_eq!(job.len(), 1, "{what}: the waiting Job");
    assert_eq!(
        job[0]["metadata"]["annotations"]["helm.sh/hook"],
        "pre-delete"
    );
    assert!(
        strs(&job[0]["spec"]["template"]["spec"]["containers"][0]["args"]).contains(&format!(
            "daemonset/{}",
            hook_ds["metadata"]["name"].as_str().unwrap()
        )),
        "{what}"
    );
}

fn values_of(path: Option<&Path>) -> serde_yaml::Value {
    let base: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let Some(path) = path else { return base };
    let over: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fn merge(base: &mut serde_yaml::Value, over: &serde_yaml::Value) {
        match (base, over) {
            (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(o)) => {
                for (k, v) in o {
                    match b.get_mut(k) {
                        Some(bv) => merge(bv, v),
                        None => {
                            b.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            (b, o) => *b = o.clone(),
        }
    }
    let mut v = base;
    merge(&mut v, &over);
    v
}

#[test]
fn chart_lints_and_renders_with_default_and_ci_values() {
    let ci = chart().join("ci/ci-values.yaml");
    for values in [None, Some(ci.as_path())] {
        let what = values.map_or("default values".to_string(), |p| p.display().to_string());
        let mut lint = Command::new(helm());
        lint.args(["lint", "--strict"]).arg(chart());
        if let Some(v) = values {
            lint.arg("--values").arg(v);
        }
        let out = run(&mut lint).unwrap_or_else(|e| panic!("helm lint, {what}: {e:#}"));
        assert!(out.contains("0 chart(s) failed"), "{what}: {out}");
        let objs = template(values, "mesh-system").unwrap_or_else(|e| panic!("{what}: {e:#}"));
        check_rendering(&objs, &values_of(values), &what);
        let monitors = kind(&objs, "ServiceMonitor");
        if values.is_some() {
            assert_eq!(
                monitors.len(),
                1,
                "{what}: the CI values turn the ServiceMonitor on"
            );
            assert_eq!(monitors[0]["spec"]["endpoints"][0]["port"], "metrics");
            let ds = kind(&objs, "DaemonSet")
                .into_iter()
                .find(|o| !is_hook(o))
                .unwrap();
            assert_eq!(
                ds["spec"]["template"]["spec"]["containers"][0]["image"],
                "registry.example.test/meshaccel/meshaccel:ci"
            );
        } else {
            assert!(monitors.is_empty(), "no ServiceMonitor by default");
        }
        assert!(
            objs.iter().all(|o| o["metadata"]["namespace"].is_null()
                || o["metadata"]["namespace"] == "mesh-system"),
            "{what}: everything in the release namespace"
        );
    }
    // A ServiceMonitor without the Service it selects is refused.
    let err = run(Command::new(helm())
        .args(["template", "rel"])
        .arg(chart())
        .args([
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "metrics.service.enabled=false",
        ]))
    .unwrap_err();
    assert!(format!("{err:#}").contains("serviceMonitor.enabled needs metrics.service.enabled"));
}

#[test]
fn dockerfile_builds_the_binary_the_chart_runs() {
    let text = std::fs::read_to_string(root().join("accelerator/Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "a build and a runtime stage: {froms:?}");
    assert!(froms[0].ends_with(" AS build"), "{froms:?}");
    // The build stage uses the pinned eBPF toolchain file and builds the meshaccel binary.
    assert!(text.contains("bpf-progs/TOOLCHAIN") && text.contains("rust-src"));
    assert!(text.contains("bpf-linker"));
    assert!(text.contains("cargo build --release --locked -p meshaccel --bin meshaccel"));
    assert!(text.contains("install -D -m 0755 target/release/meshaccel /out/meshaccel"));
    // The runtime stage copies exactly that binary to where the entrypoint runs it.
    let last_stage = &lines[lines.iter().position(|l| *l == froms[1]).unwrap()..];
    assert!(
        last_stage.contains(&"COPY --from=build /out/meshaccel /usr/local/bin/meshaccel"),
        "{last_stage:?}"
    );
    assert!(
        last_stage.contains(&r#"ENTRYPOINT ["/usr/local/bin/meshaccel"]"#),
        "{last_stage:?}"
    );
    assert!(
        last_stage.iter().any(|l| l.contains("iptables")),
        "doctor --netns needs iptables-save"
    );
    // The chart passes subcommands as arguments to that entrypoint, never a command.
    for values in [None, Some(chart().join("ci/ci-values.yaml"))] {
        let objs = template(values.as_deref(), "x").unwrap();
        for o in kind(&objs, "DaemonSet") {
            let spec = &o["spec"]["template"]["spec"];
            for c in spec["containers"]
                .as_array()
                .into_iter()
                .chain(spec["initContainers"].as_array())
                .flatten()
                .filter(|c| c["image"].as_str().unwrap().contains("meshaccel"))
            {
                let args = strs(&c["args"]);
                if c["command"].is_null() {
                    assert!(
                        ["agent", "uninstall"].contains(&args[0].as_str()),
                        "{}: args {args:?}",
                        c["name"]
                    );
                } else {
                    // The idle container of the hook: a plain command of the runtime image.
                    assert_eq!(strs(&c["command"]), ["sleep", "infinity"]);
                }
            }
        }
    }
    let ignore =
        std::fs::read_to_string(root().join("accelerator/Dockerfile.dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context skips target/"
    );
}

/// Waits for `f` to return `Some` (30 s).
fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    support::wait_for_secs(what, 30, f)
}

/// Every field of `want` is in `got` with the same value (the API server adds defaults, and
/// omits zero values: `false`, `0`, `""`, empty lists and maps).
fn assert_subset(want: &Value, got: &Value, path: &str) {
    let zero = |v: &Value| match v {
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Null => true,
    };
    if got.is_null() && zero(want) {
        return;
    }
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                let gv = g.get(k).unwrap_or(&Value::Null);
                assert_subset(v, gv, &format!("{path}.{k}"));
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            assert_eq!(w.len(), g.len(), "{path}: {want} vs {got}");
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                assert_subset(a, b, &format!("{path}[{i}]"));
            }
        }
        (w, g) => assert_eq!(w, g, "{path}"),
    }
}

#[test]
fn chart_installs_into_a_real_apiserver_and_uninstalls() {
    meshaccel_e2e::require_root();
    let api = KubeApi::start().expect("etcd + kube-apiserver (scripts/install-kube.sh)");
    let kubeconfig = api.admin_kubeconfig().to_path_buf();
    let ns = "meshaccel-system";
    let release: String = format!("meshaccel-{}", api.run_id())
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let helm_cmd = |args: &[&str]| {
        let mut c = Command::new(helm());
        c.args(args)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--namespace", ns])
            // helm keeps its caches and config in the run's folder, not in $HOME.
            .env("HELM_CACHE_HOME", api.dir().join("helm-cache"))
            .env("HELM_CONFIG_HOME", api.dir().join("helm-config"))
            .env("HELM_DATA_HOME", api.dir().join("helm-data"));
        c
    };
    let out = run(helm_cmd(&["install", &release])
        .arg(chart())
        .arg("--create-namespace"))
    .expect("helm install");
    assert!(
        out.contains("meshaccel.io/enabled=true"),
        "NOTES tell how to label a namespace:\n{out}"
    );
    assert!(
        out.contains("meshaccel status"),
        "NOTES tell how to check status:\n{out}"
    );

    // What helm rendered for this release is what the API server stores.
    let manifest = run(&mut helm_cmd(&["get", "manifest", &release])).unwrap();
    let rendered = docs(&manifest).unwrap();
    let kinds: BTreeSet<&str> = rendered.iter().filter_map(|o| o["kind"].as_str()).collect();
    for k in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
    ] {
        assert!(kinds.contains(k), "release renders a {k}: {kinds:?}");
    }
    assert!(
        !manifest.contains("helm.sh/hook"),
        "hooks are not part of the release's objects"
    );
    let stored = |o: &Value| -> anyhow::Result<Option<Value>> {
        let name = o["metadata"]["name"].as_str().unwrap().to_string();
        let kind = o["kind"].as_str().unwrap().to_string();
        kube_api::block_on(async {
            let c = api.admin_client().await?;
            let v = match kind.as_str() {
                "DaemonSet" => Api::<DaemonSet>::namespaced(c, ns)
                    .get_opt(&name)
                    .await?
                    .map(serde_json::to_value),
                "ServiceAccount" => Api::<ServiceAccount>::namespaced(c, ns)
                    .get_opt(&name)
                    .await?
                    .map(serde_json::to_value),
                "Service" => Api::<Service>::namespaced(c, ns)
                    .get_opt(&name)
                    .await?
                    .map(serde_json::to_value),
                "ClusterRole" => Api::<ClusterRole>::all(c)
                    .get_opt(&name)
                    .await?
                    .map(serde_json::to_value),
                "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(c)
                    .get_opt(&name)
                    .await?
                    .map(serde_json::to_value),
                "Job" => Api::<Job>::namespaced(c, ns)
                    .get_opt(&name)
                    .await?
                    .map(serde_json::to_value),
                "Role" => Api::<Role>::namespaced(c, ns)
                    .get_opt(&name)
                    .await?
                    .map(serde_json::to_value),
                "RoleBinding" => Api::<RoleBinding>::namespaced(c, ns)
                    .get_opt(&name)
                    .await?
                    .map(serde_json::to_value),
                other => bail!("unexpected kind {other}"),
            };
            Ok(v.transpose()?)
        })
    };
    for o in &rendered {
        let got = stored(o)
            .unwrap()
            .unwrap_or_else(|| panic!("{} {} was not created", o["kind"], o["metadata"]["name"]));
        let mut want = o.clone();
        // The API server stores integers as given; strings as given; defaults are extra.
        want["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("namespace");
        assert_subset(
            &want,
            &got,
            &format!("{} {}", o["kind"], o["metadata"]["name"]),
        );
    }

    // `helm uninstall` runs the pre-delete hook and waits for its Job; there is no Job
    // controller here, so the test marks the Job complete once helm created it.
    let hooks = docs(&run(&mut helm_cmd(&["get", "hooks", &release])).unwrap()).unwrap();
    let hook_name = kind(&hooks, "Job")
        .first()
        .expect("the release has the uninstall hook Job")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let mut uninstall = helm_cmd(&["uninstall", &release, "--timeout", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let hook_objs = wait_for("helm to create the uninstall hook's Job", || {
        kube_api::block_on(async {
            let c = api.admin_client().await.ok()?;
            Api::<Job>::namespaced(c, ns)
                .get_opt(&hook_name)
                .await
                .ok()
                .flatten()
        })
    });
    assert_eq!(
        hook_objs
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .args
            .as_ref()
            .unwrap()[0],
        "rollout"
    );
    // The hook's DaemonSet (the per-node `meshaccel uninstall`) and its RBAC exist too.
    for (k, n) in [
        ("DaemonSet", &hook_name),
        ("Role", &hook_name),
        ("RoleBinding", &hook_name),
        ("ServiceAccount", &hook_name),
    ] {
        let probe = serde_json::json!({"kind": k, "metadata": {"name": n}});
        assert!(stored(&probe).unwrap().is_some(), "hook {k} {n}");
    }
    kube_api::block_on(async {
        let c = api.admin_client().await?;
        let patch = serde_json::json!({"status": {"succeeded": 1, "conditions": [
            {"type": "Complete", "status": "True", "lastProbeTime": null, "lastTransitionTime": null}
        ]}});
        Api::<Job>::namespaced(c, ns)
            .patch_status(&hook_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        anyhow::Ok(())
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = uninstall.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = uninstall.kill();
            panic!("helm uninstall did not finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = uninstall.wait_with_output().unwrap();
    assert!(
        status.success(),
        "helm uninstall: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for o in &rendered {
        let gone = wait_for("objects deleted", || match stored(o) {
            Ok(None) => Some(true),
            _ => None,
        });
        assert!(gone);
    }
    for k in ["DaemonSet", "Job", "Role", "RoleBinding", "ServiceAccount"] {
        let probe = serde_json::json!({"kind": k, "metadata": {"name": hook_name}});
        assert!(
            stored(&probe).unwrap().is_none(),
            "hook {k} deleted after it succeeded"
        );
    }
}
