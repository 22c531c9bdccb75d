//! The Kubernetes manifests in deploy/ and the Dockerfile agree with the binary: the sidecar's
//! args parse with its real CLI, ports and probes line up, and the RBAC grants what the SSRF
//! allowlist reads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sidecar::{cli, Config};

const SIDECAR: &str = "routing-sidecar";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every document of every YAML file in deploy/, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(doc).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

fn one<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The Deployment whose pod runs a container named `name`, and that container.
fn pod_with<'a>(docs: &'a [(String, Value)], name: &str) -> (&'a Value, &'a Value) {
    of_kind(docs, "Deployment")
        .into_iter()
        .find_map(|d| {
            let c = d["spec"]["template"]["spec"]["containers"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == name)?;
            Some((d, c))
        })
        .unwrap_or_else(|| panic!("no Deployment runs a container named {name}"))
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn container_ports(c: &Value) -> BTreeSet<u64> {
    c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect()
}

fn assert_health_probe(c: &Value, probe: &str, ports: &BTreeSet<u64>) {
    assert_probe(c, probe, "/health", ports);
}

/// `c`'s `probe` is an HTTP GET of `path` on one of `ports`.
fn assert_probe(c: &Value, probe: &str, path: &str, ports: &BTreeSet<u64>) {
    let get = &c[probe]["httpGet"];
    assert_eq!(get["path"], path, "{} {probe}", c["name"]);
    let port = get["port"].as_u64().expect("numeric probe port");
    assert!(ports.contains(&port), "{} {probe} on {port}", c["name"]);
}

/// A probe's field, or Kubernetes' default for it.
fn probe_field(c: &Value, probe: &str, field: &str, default: u64) -> u64 {
    c[probe][field].as_u64().unwrap_or(default)
}

/// `selector` (matchLabels) selects a pod with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| s.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn kustomization_lists_every_manifest() {
    let docs = documents();
    let kustomization = one(&docs, "Kustomization");
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let files: BTreeSet<String> = docs
        .iter()
        // A PodMonitor needs the Prometheus Operator's CRDs: podmonitor.yaml is applied alone.
        .filter(|(_, d)| d["apiVersion"] != "monitoring.coreos.com/v1")
        .map(|(f, _)| f.clone())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
    // Every object has the fields kubectl requires.
    for (file, d) in &docs {
        assert!(d["apiVersion"].is_string(), "{file}: apiVersion");
        assert!(d["kind"].is_string(), "{file}: kind");
        if d["kind"] != "Kustomization" {
            assert!(d["metadata"]["name"].is_string(), "{file}: metadata.name");
        }
    }
}

#[test]
fn the_sidecar_args_parse_with_the_real_cli_and_match_the_pod() {
    let docs = documents();
    let (decode, sidecar) = pod_with(&docs, SIDECAR);
    let mut args = strings(&sidecar["args"]);
    assert!(sidecar["command"].is_null(), "the image's ENTRYPOINT runs");
    // The pool's name and namespace come from the container's env, as the kubelet sets it.
    for env in sidecar["env"].as_array().into_iter().flatten() {
        let value = env["value"].as_str().unwrap_or("from-field-ref");
        match env["name"].as_str() {
            Some("INFERENCE_POOL_NAME") => args.push(format!("-inference-pool-name={value}")),
            Some("INFERENCE_POOL_NAMESPACE") => {
                args.push(format!("-inference-pool-namespace={value}"))
            }
            _ => {}
        }
    }
    let parsed = cli::parse_from(std::iter::once("llm-d-routing-sidecar".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("deploy/ sidecar args: {e}"));
    assert_eq!(parsed.args.port, 8000);
    assert_eq!(config_port(&parsed), 8001);
    let drain = parsed.args.drain_timeout;
    let drain_delay = parsed.args.drain_delay;
    let config =
        Config::try_from(parsed.clone()).unwrap_or_else(|e| panic!("deploy/ sidecar args: {e}"));
    assert_eq!(config.metrics_listen.map(|a| a.port()), Some(9090));
    let pool = config.ssrf.clone().and_then(|s| s.inference_pool);
    assert_eq!(
        pool.map(|(_, name)| name).as_deref(),
        Some("vllm-pool"),
        "SSRF protection watches the pool"
    );
    let ports = container_ports(sidecar);
    assert_eq!(
        ports,
        [
            8000,
            u64::from(config.metrics_listen.map_or(0, |a| a.port()))
        ]
        .into_iter()
        .collect()
    );
    // Readiness follows vLLM and the drain; liveness is the sidecar alone.
    assert_probe(sidecar, "readinessProbe", "/readyz", &ports);
    assert_health_probe(sidecar, "livenessProbe", &ports);
    // Kubelet sees the drain's 503 before the delay ends and the listener closes.
    let to_unready = probe_field(sidecar, "readinessProbe", "periodSeconds", 10)
        * probe_field(sidecar, "readinessProbe", "failureThreshold", 3);
    assert!(
        !drain_delay.is_zero() && to_unready <= drain_delay.as_secs(),
        "readiness fails after {to_unready}s, -drain-delay is {drain_delay:?}"
    );
    assert!(
        sidecar["lifecycle"]["preStop"].is_null(),
        "the sidecar delays itself (-drain-delay)"
    );
    assert_eq!(sidecar["securityContext"]["runAsUser"], 65532);
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);

    // vLLM in the same pod listens where the sidecar looks for it.
    let vllm = container(decode, "vllm");
    assert!(
        strings(&vllm["args"]).contains(&"--port=8001".to_string()),
        "{vllm}"
    );
    let vllm_ports = container_ports(vllm);
    assert!(vllm_ports.contains(&8001));
    assert_health_probe(vllm, "readinessProbe", &vllm_ports);
    // vLLM, signalled with the sidecar, keeps serving through the sidecar's delay.
    let hook = strings(&vllm["lifecycle"]["preStop"]["exec"]["command"]);
    let slept = match hook.as_slice() {
        [sleep, secs] if sleep == "sleep" => secs.parse::<u64>().expect("sleep seconds"),
        _ => panic!("vLLM's preStop is not `sleep N`: {hook:?}"),
    };
    assert!(slept >= drain_delay.as_secs(), "vLLM stops after {slept}s");

    // The pool named in the env is the one deployed, in the pod's namespace.
    let env = sidecar["env"].as_array().expect("env");
    let var = |name: &str| env.iter().find(|e| e["name"] == name).expect(name);
    let pool = one(&docs, "InferencePool");
    assert_eq!(
        var("INFERENCE_POOL_NAME")["value"],
        pool["metadata"]["name"]
    );
    assert_eq!(
        var("INFERENCE_POOL_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    // Long enough for the delay and the drain.
    let grace = decode["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > (drain_delay + drain).as_secs(),
        "terminationGracePeriodSeconds {grace} <= -drain-delay {drain_delay:?} + -drain-timeout {drain:?}"
    );
}

/// The decoder port the parsed flags resolve to.
fn config_port(parsed: &cli::Parsed) -> u16 {
    Config::try_from(parsed.clone())
        .expect("config")
        .decoder
        .port()
}

#[test]
fn the_prefill_pod_serves_vllm_on_the_pool_port() {
    let docs = documents();
    let deployments = of_kind(&docs, "Deployment");
    let prefill = deployments
        .iter()
        .find(|d| d["spec"]["template"]["metadata"]["labels"]["llm-d.ai/role"] == "prefill")
        .expect("a prefill Deployment");
    let vllm = container(prefill, "vllm");
    assert!(strings(&vllm["args"]).contains(&"--port=8000".to_string()));
    let ports = container_ports(vllm);
    assert!(ports.contains(&8000));
    assert_health_probe(vllm, "readinessProbe", &ports);
    assert_health_probe(vllm, "livenessProbe", &ports);
}

#[test]
fn the_pool_and_the_service_select_the_right_pods_and_ports() {
    let docs = documents();
    let pool = one(&docs, "InferencePool");
    assert_eq!(pool["spec"]["targetPorts"][0]["number"], 8000);
    let pool_selector = &pool["spec"]["selector"]["matchLabels"];
    let roles: BTreeSet<String> = of_kind(&docs, "Deployment")
        .into_iter()
        .map(|d| &d["spec"]["template"]["metadata"]["labels"])
        .filter(|labels| selects(pool_selector, labels))
        .filter_map(|labels| labels["llm-d.ai/role"].as_str().map(str::to_string))
        .collect();
    assert_eq!(roles, ["decode", "prefill"].map(String::from).into());

    let service = one(&docs, "Service");
    let (decode, _) = pod_with(&docs, SIDECAR);
    assert!(selects(
        &service["spec"]["selector"],
        &decode["spec"]["template"]["metadata"]["labels"]
    ));
    let targets: BTreeSet<u64> = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["targetPort"].as_u64())
        .collect();
    assert_eq!(targets, [8000, 9090].into_iter().collect());
}

#[test]
fn rbac_grants_the_ssrf_allowlist_read_access() {
    let docs = documents();
    let role = one(&docs, "Role");
    let rules = role["rules"].as_array().expect("rules");
    for (group, resource) in [
        ("inference.networking.k8s.io", "inferencepools"),
        ("", "pods"),
    ] {
        let rule = rules
            .iter()
            .find(|r| {
                strings(&r["apiGroups"]).iter().any(|g| g == group)
                    && strings(&r["resources"]).iter().any(|x| x == resource)
            })
            .unwrap_or_else(|| panic!("no rule for {resource}"));
        let verbs: BTreeSet<String> = strings(&rule["verbs"]).into_iter().collect();
        assert_eq!(verbs, ["get", "list", "watch"].map(String::from).into());
    }
    let binding = one(&docs, "RoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let account = one(&docs, "ServiceAccount");
    let (decode, _) = pod_with(&docs, SIDECAR);
    assert_eq!(
        decode["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
}
