//! The Kubernetes install (`daemonset/`) as an operator meets it: every overlay renders and validates
//! against the Kubernetes API schemas, the variables the manifests set are ones meshnode reads and
//! configure each role without error, the image's `install-cni` name runs the CNI agent as Istio's chart
//! calls it, and the Grafana dashboard queries only metrics meshnode exports.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Whether `daemonset/validate.sh` can run here (a renderer and the validator), else skipped (a failure
/// under MESHNODE_TEST_STRICT, which CI sets after installing both).
fn validator_available(test: &str) -> bool {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let validator = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|s| s.success());
    let have = (Path::new(&kubectl).is_file() || on_path(&kubectl)) && validator;
    meshnode::test_gate::needs(
        test,
        have,
        "needs kubectl and kubernetes-validate (apt-get install kubernetes-client; pip install kubernetes-validate)",
    )
}

fn run_validate(dir: &Path) -> (bool, String) {
    let out = Command::new("bash")
        .arg(dir.join("validate.sh"))
        .output()
        .expect("run bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_overlay_renders_and_validates() {
    if !validator_available("every_overlay_renders_and_validates") {
        return;
    }
    let (ok, text) = run_validate(&repo().join("daemonset"));
    assert!(ok, "daemonset/validate.sh failed:\n{text}");
    for overlay in ["plain", "gke", "k3s", "openshift", "microk8s", "minikube"] {
        assert!(
            text.contains(&format!("ok overlays/{overlay}:")),
            "{overlay} not validated:\n{text}"
        );
    }
    assert!(text.contains("ok waypoint:"), "{text}");
    assert!(text.contains("ok istio/:"), "{text}");
}

/// The validator is real: a misspelt field in the base, a kustomization naming a missing patch and a
/// wrong Istio value each fail it.
#[test]
fn validation_rejects_a_broken_manifest() {
    if !validator_available("validation_rejects_a_broken_manifest") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("daemonset");
    let status = Command::new("cp")
        .args(["-r"])
        .arg(repo().join("daemonset"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let edit = |file: &str, from: &str, to: &str| {
        let path = copy.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    edit(
        "base/ztunnel.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesytem: true",
    );
    edit(
        "overlays/k3s/kustomization.yaml",
        "- cni-paths.yaml",
        "- cni-path.yaml",
    );
    edit(
        "istio/cni-values.yaml",
        "dnsCapture: true",
        "dnsCapture: yes please",
    );
    let (ok, text) = run_validate(&copy);
    assert!(!ok, "a broken manifest passed:\n{text}");
    assert!(
        text.contains("'readOnlyRootFilesytem' was unexpected"),
        "{text}"
    );
    assert!(
        text.contains("FAIL overlays/k3s: kubectl kustomize failed"),
        "{text}"
    );
    assert!(text.contains("dnsCapture: must be true or false"), "{text}");
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// A container's environment as the kubelet would give it: literal values, fieldRefs as a pod would see
/// them, and the ConfigMaps of `envFrom` (from `docs`).
fn container_env(docs: &[Value], container: &Value) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for from in container["envFrom"].as_sequence().into_iter().flatten() {
        let cm = find(
            docs,
            "ConfigMap",
            from["configMapRef"]["name"].as_str().unwrap(),
        );
        for (k, v) in cm["data"].as_mapping().unwrap() {
            env.insert(
                k.as_str().unwrap().to_string(),
                v.as_str().unwrap().to_string(),
            );
        }
    }
    for e in container["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => "pod-abc12".into(),
                Some("metadata.namespace") => "istio-system".into(),
                Some("spec.nodeName") => "node-1".into(),
                Some("status.podIP") => "10.244.0.7".into(),
                Some("spec.serviceAccountName") => "ztunnel".into(),
                other => panic!("{name}: unexpected valueFrom {other:?}"),
            }
        };
        env.insert(name, value);
    }
    env
}

/// Every variable a meshnode role reads (by the constants its config modules name them with), plus the
/// Rust runtime's and the logger's.
fn variables_meshnode_reads() -> BTreeSet<&'static str> {
    use meshnode::cni_agent::config as a;
    use meshnode::config as c;
    use meshnode::config::waypoint as w;
    [
        c::PROXY_MODE,
        c::INPOD_UDS,
        c::INPOD_PORT_REUSE,
        c::PROXY_WORKLOAD_INFO,
        c::LOCAL_XDS_PATH,
        c::XDS_ADDRESS,
        c::CA_ADDRESS,
        c::XDS_ROOT_CA,
        c::CA_ROOT_CA,
        c::AUTH_TOKEN,
        c::ISTIO_META_CLUSTER_ID,
        c::POD_NAME,
        c::POD_NAMESPACE,
        c::SERVICE_ACCOUNT,
        c::INSTANCE_IP,
        c::PACKET_MARK,
        c::NODE_NAME,
        c::NETWORK,
        c::CLUSTER_ID,
        c::TERMINATION_GRACE_PERIOD_SECONDS,
        c::ZTUNNEL_WORKER_THREADS,
        c::MESHNODE_RESUMABLE_STREAMS,
        c::MESHNODE_HANDOVER_SOCKET,
        w::TRUST_DOMAIN,
        w::WAYPOINT_NAME,
        a::CNI_AGENT_RUN_DIR,
        a::ZTUNNEL_UDS_ADDRESS,
        a::EXCLUDE_NAMESPACES,
        a::AMBIENT_ENABLEMENT_SELECTOR,
        a::AMBIENT_DNS_CAPTURE,
        a::AMBIENT_IPV6,
        a::MESHNODE_HOST_PREFIX,
        a::MOUNTED_CNI_NET_DIR,
        a::MESHNODE_CNI_BIN_DIR,
        a::MONITORING_PORT,
        a::MESHNODE_HANDOVER_SOCKET,
        a::MESHNODE_RESUME_WAIT,
        // meshnode::logging's filter and the Rust runtime's backtraces.
        "RUST_LOG",
        "RUST_BACKTRACE",
    ]
    .into_iter()
    .collect()
}

fn assert_read(where_: &str, env: &HashMap<String, String>) {
    let known = variables_meshnode_reads();
    let unknown: Vec<_> = env.keys().filter(|k| !known.contains(k.as_str())).collect();
    assert!(
        unknown.is_empty(),
        "{where_} sets variables meshnode does not read: {unknown:?}"
    );
}

#[test]
fn manifests_configure_each_role_with_variables_it_reads() {
    let base = repo().join("daemonset/base");
    let mut docs = yaml_docs(&base.join("ztunnel.yaml"));
    docs.extend(yaml_docs(&base.join("istio-cni.yaml")));

    // The node proxy, as Istio's ztunnel chart runs it.
    let ds = find(&docs, "DaemonSet", "ztunnel");
    let proxy = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        proxy["args"],
        serde_yaml::from_str::<Value>("[proxy, ztunnel]").unwrap()
    );
    let env = container_env(&docs, proxy);
    assert_read("DaemonSet ztunnel", &env);
    let cfg = meshnode::config::Config::from_source(&env).expect("the proxy's environment");
    assert_eq!(cfg.proxy_mode, meshnode::config::ProxyMode::Shared);
    assert_eq!(
        env["TERMINATION_GRACE_PERIOD_SECONDS"],
        ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap()
            .to_string(),
        "the drain deadline follows the pod's grace period"
    );
    // Upgrades hand connections over: the new pod starts beside the old one, and both mount the
    // hand-over socket's directory from the node.
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        (
            rolling["maxSurge"].as_u64(),
            rolling["maxUnavailable"].as_u64()
        ),
        (Some(1), Some(0)),
        "a new pod beside the old one on each node"
    );
    assert!(cfg.resumable_streams, "resumable streams on");
    let handover = cfg.handover_socket.clone();
    let socket_dir = cfg
        .handover_socket
        .as_ref()
        .expect("a hand-over socket")
        .parent()
        .unwrap()
        .to_str()
        .unwrap();
    let mount = proxy["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(socket_dir))
        .unwrap_or_else(|| panic!("{socket_dir} not mounted"));
    let volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    assert!(
        volume["hostPath"]["path"].as_str().is_some(),
        "the hand-over socket is on the node, shared by the old pod and the new one: {volume:?}"
    );

    // The CNI agent, as Istio's istio-cni chart runs it.
    let ds = find(&docs, "DaemonSet", "istio-cni-node");
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"]["k8s-app"],
        "istio-cni-node"
    );
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(agent["command"][0], "install-cni");
    let env = container_env(&docs, agent);
    assert_read("DaemonSet istio-cni-node", &env);
    let cfg = meshnode::cni_agent::config::AgentConfig::from_source(&env)
        .expect("the agent's environment");
    assert!(cfg.rules.dns_capture, "DNS capture on, as Istio's chart");
    assert_eq!(cfg.policy.selectors.len(), 2, "Istio's default selectors");
    assert_eq!(cfg.host_prefix, PathBuf::from("/host"));
    assert_eq!(cfg.run_dir, PathBuf::from("/var/run/istio-cni"));
    // A proxy restarting with no new pod beside it leaves its connections with the agent, on the
    // proxy's hand-over socket's directory (mounted below).
    assert_eq!(
        cfg.handover_socket, handover,
        "the agent holds on the proxy's hand-over socket"
    );
    let install = cfg.install.expect("the agent installs the plugin");
    assert_eq!(install.conf_dir, PathBuf::from("/host/etc/cni/net.d"));
    assert_eq!(install.bin_dir, PathBuf::from("/host/opt/cni/bin"));
    // Each path the agent uses is mounted.
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for path in [
        &install.conf_dir,
        &install.bin_dir,
        &cfg.run_dir,
        &cfg.zds_path.parent().unwrap().to_path_buf(),
    ] {
        assert!(
            mounts.contains(&path.to_str().unwrap()),
            "{} not mounted: {mounts:?}",
            path.display()
        );
    }
    let probe = &agent["readinessProbe"]["httpGet"];
    assert_eq!(
        (probe["path"].as_str(), probe["port"].as_u64()),
        (Some("/readyz"), Some(8000))
    );
    assert_eq!(
        agent["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(cfg.monitoring_port))
    );

    // The waypoint.
    let docs = yaml_docs(&repo().join("daemonset/waypoint/waypoint.yaml"));
    let deploy = find(&docs, "Deployment", "waypoint");
    let env = container_env(&docs, &deploy["spec"]["template"]["spec"]["containers"][0]);
    assert_read("Deployment waypoint", &env);
    let wp =
        meshnode::config::WaypointConfig::from_source(&env).expect("the waypoint's environment");
    assert!(
        wp.base.resumable_streams,
        "connections through the waypoint outlive node proxy upgrades"
    );

    // What the Istio-chart overlays add to istio-cni's environment.
    for file in [
        "daemonset/istio/cni-values.yaml",
        "daemonset/istio/meshnode-ambient.yaml",
    ] {
        let env = chart_env(file, "cni");
        assert_read(file, &env);
        let agent = meshnode::cni_agent::config::AgentConfig::from_source(
            &env.into_iter()
                .chain([("NODE_NAME".to_string(), "n".to_string())])
                .collect::<HashMap<_, _>>(),
        )
        .expect(file);
        let proxy = meshnode::config::Config::from_source(&chart_env(file, "ztunnel")).expect(file);
        assert_eq!(
            agent.handover_socket, proxy.handover_socket,
            "{file}: the agent holds a restarting proxy's connections on its hand-over socket"
        );
    }
    // ... and to the node proxy's: the hand-over on upgrade, in the directory the ztunnel chart mounts.
    for file in [
        "daemonset/istio/ztunnel-values.yaml",
        "daemonset/istio/meshnode-ambient.yaml",
    ] {
        let env = chart_env(file, "ztunnel");
        assert_read(file, &env);
        let cfg = meshnode::config::Config::from_source(&env).expect(file);
        assert!(cfg.resumable_streams, "{file}");
        assert!(
            cfg.handover_socket
                .is_some_and(|p| p.starts_with("/var/run/ztunnel/")),
            "{file}: the hand-over socket in the chart's host-mounted /var/run/ztunnel"
        );
    }
}

/// The `env` values `file` gives Istio's `chart` (`cni`, `ztunnel`): a Helm values file's own, or an
/// IstioOperator's `spec.values.<chart>`.
fn chart_env(file: &str, chart: &str) -> HashMap<String, String> {
    let doc = &yaml_docs(&repo().join(file))[0];
    let values = if doc["kind"] == "IstioOperator" {
        &doc["spec"]["values"][chart]
    } else {
        doc
    };
    values["env"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
        .collect()
}

/// Istio's istio-cni chart runs `command: [install-cni]` with its log flags: through the image's
/// `install-cni` link, meshnode starts its CNI agent (here it stops at the agent's configuration: no
/// NODE_NAME), not clap's "unrecognized subcommand".
#[test]
fn install_cni_link_runs_the_cni_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("install-cni");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_meshnode"), &link).unwrap();
    let out = Command::new(&link)
        .arg("--log_output_level=info")
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NODE_NAME"), "{stderr}");
    assert!(stderr.contains("MESHNODE_AGENT_CONFIG"), "{stderr}");
}

/// Metric names a scrape shows: every registry meshnode serves, with one sample recorded in each of its
/// families through the recording API (a family without samples is not encoded at all), read off the
/// `# TYPE` lines.
fn exported_metric_names() -> BTreeSet<String> {
    use meshnode::metrics::{
        Metrics, Reporter, ResponseFlags, TrafficLabels, WaypointBinding, WaypointFailure,
        WaypointLabels, XdsTermination,
    };
    use meshnode::state::{GatewayAddress, GatewayDestination};
    use meshnode::waypoint::metrics::{labels, RequestLog};
    use std::sync::Arc;

    let (proxy, _workloads) = Metrics::with_workload_manager();
    let proxy = Arc::new(proxy);
    let labels_src = TrafficLabels::new(Reporter::source, None, None, None, None);
    proxy.open(labels_src).close(ResponseFlags::Deny, 10, 20);
    proxy
        .xds()
        .message("type.googleapis.com/istio.workload.Address", 100);
    proxy.xds().terminated(XdsTermination::Reconnect);
    let gw = GatewayAddress {
        destination: GatewayDestination::Hostname {
            namespace: "ns".into(),
            hostname: "waypoint.ns.svc.cluster.local".into(),
        },
        hbone_mtls_port: 15008,
    };
    proxy.waypoint_unavailable(&WaypointLabels::new(
        &gw,
        WaypointBinding::service,
        WaypointFailure::unreachable,
    ));

    let waypoint = Arc::new(meshnode::waypoint::WaypointMetrics::new());
    let id: meshnode::identity::Identity =
        "spiffe://cluster.local/ns/ns/sa/client".parse().unwrap();
    let mut request = RequestLog::new(
        waypoint.clone(),
        "10.0.0.1:40000".parse().unwrap(),
        id.clone(),
        "10.0.0.2:80".into(),
        http::Method::GET,
        "/".into(),
    );
    request.status = 200;
    request.finish();
    let tcp = labels(&id, None, None, None, "-").into();
    waypoint.tcp_opened(&tcp);
    waypoint.tcp_closed(&tcp, 1, 1);

    let texts = [
        proxy.encode(),
        waypoint.encode(),
        meshnode::cni_agent::metrics::AgentMetrics::default().encode(),
    ];
    let mut names = BTreeSet::new();
    for line in texts.iter().flat_map(|t| t.lines()) {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

const PROMQL_FUNCTIONS: &[&str] = &[
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "topk",
    "label_values",
];

/// The metric names and function names a PromQL expression uses. Label lists (`by (...)`), matchers
/// (`{...}`), ranges (`[...]`), strings and numbers are skipped; any other word is a metric name.
fn promql_words(expr: &str) -> (Vec<String>, Vec<String>) {
    let b = expr.as_bytes();
    let (mut metrics, mut functions) = (Vec::new(), Vec::new());
    let skip_to = |mut i: usize, close: u8| {
        while i < b.len() && b[i] != close {
            if b[i] == b'"' {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let mut i = 0;
    let mut label_list_next = false;
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            i = skip_to(i + 1, b'}');
        } else if c == b'[' {
            i = skip_to(i + 1, b']');
        } else if c == b'(' && label_list_next {
            label_list_next = false;
            i = skip_to(i + 1, b')');
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let rest = expr[i..].trim_start();
            // An aggregation may put its label list first: `sum by (x) (...)`.
            let aggregates = ["by", "without"].iter().any(|k| {
                rest.strip_prefix(k).is_some_and(|r| {
                    !r.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                })
            });
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word)
            {
                label_list_next = true;
            } else if rest.starts_with('(') || aggregates {
                functions.push(word.to_string());
            } else {
                metrics.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    (metrics, functions)
}

fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.starts_with("label_values(") => {
                        // label_values(<selector>, <label>): the label is not a metric.
                        let inner = &s["label_values(".len()..s.len() - 1];
                        out.push(
                            inner
                                .rsplit_once(',')
                                .map_or(inner, |(sel, _)| sel)
                                .to_string(),
                        );
                    }
                    _ => collect_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_only_metrics_meshnode_exports() {
    let path = repo().join("daemonset/dashboards/meshnode.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queries = Vec::new();
    collect_queries(&dash, &mut queries);
    assert!(queries.len() > 20, "{queries:?}");

    let exported = exported_metric_names();
    let mut used = BTreeSet::new();
    for q in &queries {
        let (metrics, functions) = promql_words(q);
        assert!(!metrics.is_empty(), "no metric in {q:?}");
        for f in functions {
            assert!(
                PROMQL_FUNCTIONS.contains(&f.as_str()),
                "unknown function {f:?} in {q:?}"
            );
        }
        for m in metrics {
            assert!(
                exported.contains(&m),
                "{q:?} uses {m}, which meshnode does not export (it exports {exported:?})"
            );
            used.insert(m);
        }
    }
    // The views the dashboard promises: proxy traffic, refusals, xDS, process, workload manager, the
    // agent, waypoint requests.
    for m in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_connections_failed_total",
        "istio_xds_message_total",
        "istio_xds_connection_terminations_total",
        "process_open_fds",
        "process_resident_memory_bytes",
        "workload_manager_active_proxy_count",
        "meshnode_cni_pod_rules_repaired_total",
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
    ] {
        assert!(used.contains(m), "the dashboard shows no {m}");
    }
    assert!(
        queries
            .iter()
            .any(|q| q.contains("istio_requests_total{reporter=\"waypoint\"")),
        "waypoint requests are selected by reporter=\"waypoint\""
    );
    // Grafana needs unique panel ids.
    let mut ids = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        ids.push(p["id"].as_u64().unwrap());
    }
    let unique: BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate panel ids");
}

#[test]
fn promql_words_finds_metrics_and_skips_labels() {
    let (m, f) = promql_words(
        r#"histogram_quantile(0.99, sum by (le, x) (rate(a_bucket{r="w", c=~"5.."}[$__rate_interval])))"#,
    );
    assert_eq!(m, ["a_bucket"]);
    assert_eq!(f, ["histogram_quantile", "sum", "rate"]);
    let (m, _) = promql_words("sum(bare_metric) / max(other{a=\"}\"})");
    assert_eq!(m, ["bare_metric", "other"]);
}
