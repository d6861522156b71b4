//! The Kubernetes manifests under `deploy/`: every object is a real Kubernetes type with
//! no misspelled field, the DaemonSet passes only flags the built `lb-agent` accepts, and
//! the ClusterRole grants exactly what the Kubernetes source reads. No cluster is needed
//! (nor available here): this is what can be checked without one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use lb_userspace::sources::kube::{API_RESOURCES, API_VERBS};
use serde::Deserialize as _;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

/// Every object of every manifest under deploy/ (examples/ holds services for the file
/// source, not cluster objects; kustomization.yaml is kustomize's, checked apart).
#[derive(Default, Debug)]
struct Manifests {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    /// (file, kind/name) of every object, for the kustomization check.
    files: BTreeMap<String, Vec<String>>,
}

/// Deserializes `doc` as `T` and checks that serializing it back gives the same JSON: the
/// k8s-openapi types ignore unknown fields, so a misspelled field (`hostNetwrk: true`)
/// would otherwise pass unnoticed and be dropped by the API server.
fn typed<T>(doc: &Value, what: &str) -> Result<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let obj: T =
        serde_json::from_value(doc.clone()).with_context(|| format!("{what}: not valid"))?;
    let back = serde_json::to_value(&obj)?;
    if &back != doc {
        bail!(
            "{what}: fields the Kubernetes type does not have (misspelled?) or wrong values:\n{}",
            diff(doc, &back, "")
        );
    }
    Ok(obj)
}

/// The paths where `a` (the manifest) and `b` (the typed round trip) differ.
fn diff(a: &Value, b: &Value, path: &str) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter()
                .map(|k| match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => diff(v, w, &format!("{path}.{k}")),
                    (Some(_), None) => format!("  {path}.{k}: not a field of the type\n"),
                    (None, Some(_)) => format!("  {path}.{k}: added by the type\n"),
                    (None, None) => String::new(),
                })
                .collect()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .map(|(i, (v, w))| diff(v, w, &format!("{path}[{i}]")))
            .collect(),
        _ if a == b => String::new(),
        _ => format!("  {path}: {a} became {b}\n"),
    }
}

fn load() -> Result<Manifests> {
    let mut m = Manifests::default();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(deploy_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("file name")?
            .to_owned();
        if path.is_dir() || name == "kustomization.yaml" {
            continue;
        }
        ensure!(
            name.ends_with(".yaml"),
            "{name}: only .yaml manifests belong in deploy/"
        );
        let text = std::fs::read_to_string(&path)?;
        let mut kinds = Vec::new();
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let doc = Value::deserialize(de).with_context(|| format!("{name}: document {i}"))?;
            if doc.is_null() {
                continue;
            }
            let api = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let obj_name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let what = format!("{name}: {api} {kind} {obj_name}");
            match (api.as_str(), kind.as_str()) {
                ("v1", "ServiceAccount") => m.service_accounts.push(typed(&doc, &what)?),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    m.cluster_roles.push(typed(&doc, &what)?);
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    m.bindings.push(typed(&doc, &what)?);
                }
                ("v1", "ConfigMap") => m.config_maps.push(typed(&doc, &what)?),
                ("apps/v1", "DaemonSet") => m.daemon_sets.push(typed(&doc, &what)?),
                _ => bail!("{what}: a kind this test does not know; add it here"),
            }
            kinds.push(format!("{kind}/{obj_name}"));
        }
        ensure!(!kinds.is_empty(), "{name}: no object");
        m.files.insert(name, kinds);
    }
    Ok(m)
}

fn only<'a, T>(v: &'a [T], what: &str) -> Result<&'a T> {
    match v {
        [one] => Ok(one),
        _ => bail!("expected exactly one {what}, found {}", v.len()),
    }
}

#[test]
fn every_manifest_is_a_known_kubernetes_object_and_kustomize_lists_them_all() -> Result<()> {
    let m = load()?;
    only(&m.service_accounts, "ServiceAccount")?;
    only(&m.cluster_roles, "ClusterRole")?;
    only(&m.bindings, "ClusterRoleBinding")?;
    only(&m.config_maps, "ConfigMap")?;
    only(&m.daemon_sets, "DaemonSet")?;

    let k: Value = serde_yaml::from_str(&std::fs::read_to_string(
        deploy_dir().join("kustomization.yaml"),
    )?)?;
    ensure!(k["kind"] == "Kustomization", "kustomization.yaml: kind");
    let resources: BTreeSet<String> = k["resources"]
        .as_array()
        .context("kustomization.yaml: resources")?
        .iter()
        .map(|r| r.as_str().map(str::to_owned).context("resource is a path"))
        .collect::<Result<_>>()?;
    let files: BTreeSet<String> = m.files.keys().cloned().collect();
    assert_eq!(
        resources, files,
        "kustomization.yaml's resources must be exactly the manifests in deploy/"
    );
    // Namespaced objects go to kube-system, where system-node-critical pods are admitted.
    assert_eq!(k["namespace"], "kube-system");
    Ok(())
}

#[test]
fn cluster_role_grants_exactly_what_the_kubernetes_source_reads() -> Result<()> {
    let m = load()?;
    let role = only(&m.cluster_roles, "ClusterRole")?;
    let mut granted = BTreeSet::new();
    for r in role.rules.as_deref().unwrap_or_default() {
        ensure!(
            r.non_resource_urls.is_none() && r.resource_names.is_none(),
            "rule {r:?}: no URL or per-name grants expected"
        );
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                for v in &r.verbs {
                    ensure!(
                        g != "*" && res != "*" && v != "*",
                        "wildcards grant more than the agent reads: {r:?}"
                    );
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let wanted: BTreeSet<(String, String, String)> = API_RESOURCES
        .iter()
        .flat_map(|(g, r)| {
            API_VERBS
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(
        granted, wanted,
        "ClusterRole vs sources::kube::API_RESOURCES/API_VERBS"
    );

    // The binding gives that role to the DaemonSet's service account.
    let sa = only(&m.service_accounts, "ServiceAccount")?;
    let b = only(&m.bindings, "ClusterRoleBinding")?;
    let ds = only(&m.daemon_sets, "DaemonSet")?;
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subjects = b.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    let pod = ds.spec.template.spec.as_ref().context("pod spec")?;
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    Ok(())
}

/// What `lb-agent -h` says about a flag.
#[derive(Debug, Default)]
struct Flag {
    takes_value: bool,
    /// Clap's `[possible values: ...]`; empty when any value parses.
    possible: Vec<String>,
}

/// The flags of the built `lb-agent`, from its short help (`-h`): the lines naming a flag
/// (`      --pin-dir <PIN_DIR>`, `  -h, --help`) and the description lines under them.
fn agent_flags() -> Result<BTreeMap<String, Flag>> {
    let bin = tests::e2e::bin_dir()?.join("lb-agent");
    let out = Command::new(&bin)
        .arg("-h")
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(out.status.success(), "lb-agent -h failed: {out:?}");
    let help = String::from_utf8(out.stdout)?;
    let mut flags = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with('-') {
            let Some(long) = t.split([',', ' ']).find(|w| w.starts_with("--")) else {
                continue;
            };
            flags.insert(
                long.to_owned(),
                Flag {
                    takes_value: t.contains('<'),
                    possible: Vec::new(),
                },
            );
            last = Some(long.to_owned());
        } else if let (Some(f), Some((_, vals))) = (&last, t.split_once("[possible values: ")) {
            let vals = vals.split(']').next().unwrap_or_default();
            if let Some(flag) = flags.get_mut(f) {
                flag.possible = vals.split(", ").map(str::to_owned).collect();
            }
        }
    }
    ensure!(
        flags.contains_key("--pin-dir") && flags.contains_key("--xdp-mode"),
        "could not read flags from:\n{help}"
    );
    Ok(flags)
}

fn agent_container(ds: &DaemonSet) -> Result<&Container> {
    let pod = ds.spec.template.spec.as_ref().context("pod spec")?;
    pod.containers
        .iter()
        .find(|c| c.name == "lb-agent")
        .context("container lb-agent")
}

/// Replaces `$(VAR)` the way the kubelet does, from the container's env: literal values,
/// ConfigMap keys, and the downward API (a placeholder).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(')').context("unclosed $(")? + i;
        let var = &rest[i + 2..end];
        out.push_str(
            env.get(var)
                .with_context(|| format!("{arg}: $({var}) is not in the container's env"))?,
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[test]
fn daemonset_passes_only_flags_lb_agent_accepts() -> Result<()> {
    let m = load()?;
    let ds = only(&m.daemon_sets, "DaemonSet")?;
    let cm = only(&m.config_maps, "ConfigMap")?;
    let cm_data = cm.data.clone().unwrap_or_default();
    let c = agent_container(ds)?;

    // The env as the kubelet will build it.
    let mut env = BTreeMap::new();
    for e in c.env.as_deref().unwrap_or_default() {
        let v = match (&e.value, &e.value_from) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(src)) => {
                if let Some(k) = &src.config_map_key_ref {
                    assert_eq!(k.name, cm.metadata.name.clone().unwrap_or_default());
                    match cm_data.get(&k.key) {
                        Some(v) => Some(v.clone()),
                        None if k.optional == Some(true) => None,
                        None => bail!("env {}: key {} is not in the ConfigMap", e.name, k.key),
                    }
                } else if src.field_ref.is_some() {
                    Some("node-1".to_owned())
                } else {
                    bail!("env {}: unexpected source {src:?}", e.name)
                }
            }
            (None, None) => None,
        };
        if let Some(v) = v {
            env.insert(e.name.clone(), v);
        }
    }
    // --node-name comes from NODE_NAME (clap env), set by the downward API.
    let node = c
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .context("NODE_NAME env")?;
    assert_eq!(
        node.value_from
            .as_ref()
            .and_then(|s| s.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    let flags = agent_flags()?;
    let mut args: Vec<String> = c
        .args
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|a| expand(a, &env))
        .collect::<Result<_>>()?;
    // The ConfigMap's extra-args, split as the entrypoint's shell does.
    args.extend(
        cm_data
            .get("extra-args")
            .map(|s| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default(),
    );
    let mut given = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (a.clone(), None),
        };
        ensure!(flag.starts_with("--"), "argument {a:?} is not a --flag");
        let known = flags
            .get(&flag)
            .with_context(|| format!("lb-agent does not accept {flag}"))?;
        let value = match (known.takes_value, inline) {
            (true, Some(v)) => v,
            (true, None) => {
                i += 1;
                args.get(i)
                    .cloned()
                    .with_context(|| format!("{flag} needs a value"))?
            }
            (false, None) => String::new(),
            (false, Some(v)) => bail!("{flag} takes no value, given {v:?}"),
        };
        ensure!(
            known.possible.is_empty() || known.possible.contains(&value),
            "{flag}={value}: lb-agent accepts {:?}",
            known.possible
        );
        given.insert(flag, value);
        i += 1;
    }

    // The probes reach what --metrics-bind serves, from the node (host network).
    let bind: std::net::SocketAddr = given
        .get("--metrics-bind")
        .context("--metrics-bind")?
        .parse()?;
    let _: std::net::IpAddr = given
        .get("--health-check-address")
        .context("--health-check-address")?
        .parse()?;
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .with_context(|| format!("{path} probe"))?;
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.host.as_deref(), Some(bind.ip().to_string().as_str()));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(bind.port().into())
        );
    }

    // The pins live on the host's bpffs, mounted into the container.
    let pin_dir = given.get("--pin-dir").context("--pin-dir")?;
    assert!(pin_dir.starts_with("/sys/fs/bpf/"), "{pin_dir}");
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    let bpffs = mounts
        .iter()
        .find(|v| v.mount_path == "/sys/fs/bpf")
        .context("bpffs mount")?;
    let pod = ds.spec.template.spec.as_ref().context("pod spec")?;
    let vol = pod
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == bpffs.name)
        .context("bpffs volume")?;
    assert_eq!(
        vol.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf")
    );
    Ok(())
}

#[test]
fn daemonset_runs_on_every_node_with_capabilities_not_privileged() -> Result<()> {
    let m = load()?;
    let ds = only(&m.daemon_sets, "DaemonSet")?;
    let pod = ds.spec.template.spec.as_ref().context("pod spec")?;
    assert_eq!(pod.host_network, Some(true));
    // The cluster DNS is a Service: not reachable from the host network without kube-proxy.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // A toleration without key and with operator Exists tolerates every taint.
    assert!(
        pod.tolerations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| t.key.is_none()
                && t.operator.as_deref() == Some("Exists")
                && t.effect.is_none()),
        "{:?}",
        pod.tolerations
    );
    let c = agent_container(ds)?;
    let sc = c.security_context.as_ref().context("securityContext")?;
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().context("capabilities")?;
    let added: BTreeSet<&str> = caps
        .add
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"])
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    // The entrypoint runs what the image installs.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile"))?;
    let command = c.command.as_deref().unwrap_or_default().join(" ");
    for bin in ["lb-agent", "lbctl"] {
        let installed = format!("/usr/local/bin/{bin}");
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("COPY --from=") && l.contains(&installed)),
            "Dockerfile does not install {installed}"
        );
    }
    assert!(
        command.contains("exec /usr/local/bin/lb-agent \"$@\""),
        "{command}"
    );
    Ok(())
}
