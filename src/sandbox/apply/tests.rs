use std::collections::BTreeMap;

use super::*;

fn model() -> Model {
    Model::bookinfo("mn", BTreeMap::from([("node1".into(), "t".into())]))
}

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n";

fn apply(m: &Model, text: &str) -> Result<(Model, Vec<String>), ApplyError> {
    change(m, text, "f.yaml", Verb::Apply)
}

#[test]
fn a_peer_authentication_is_created_then_unchanged_then_configured_in_place() {
    let (m1, lines) = apply(&model(), STRICT).unwrap();
    assert_eq!(
        lines,
        ["peerauthentication.security.istio.io/default created"]
    );
    assert_eq!(m1.istio.len(), 1);
    assert!(MeshConfig::parse(&m1.mesh_yaml()).is_ok());
    let (m2, lines) = apply(&m1, STRICT).unwrap();
    assert_eq!(
        lines,
        ["peerauthentication.security.istio.io/default unchanged"]
    );
    assert_eq!(m2, m1);
    let (m3, lines) = apply(&m2, &STRICT.replace("STRICT", "PERMISSIVE")).unwrap();
    assert_eq!(
        lines,
        ["peerauthentication.security.istio.io/default configured"]
    );
    assert_eq!(m3.istio.len(), 1);
}

#[test]
fn refusals_name_the_document_and_the_field() {
    let cases = [
        // (manifest, what the message must contain)
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: default}\nspec:\n  rules:\n  - from:\n    - source: {principals: [\"\"]}\n",
         "document 1 (AuthorizationPolicy default/x): spec.rules[0].from[0].source.principals[0]"),
        ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: d, namespace: default}\nspec: {mtlz: {}}\n",
         "mtlz"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}], mirror: {host: ratings}}]}\n",
         "document 1 (VirtualService default/r): spec.http[0].mirror"),
        ("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{group: '', kind: Service, name: reviews}], rules: [{backendRefs: [{name: nowhere, port: 9080}]}]}\n",
         "nowhere"),
        ("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: r}\nspec: {}\n",
         "apiVersion"),
        ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: r}\nspec: {}\n",
         "document 1 (ServiceEntry default/r): spec.hosts"),
        ("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: r}\nspec: {}\n",
         "\"Sidecar\" (networking.istio.io/v1) is not supported"),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: r}\n", "supported: AuthorizationPolicy"),
        ("apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: d}\nspec: {}\n", "apiVersion"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: test, labels: {\"bad key!\": x}}\n", "metadata.labels.bad key!"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: test, labels: {a: \"-x\"}}\n", "metadata.labels.a"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: test, owner: me}\n", "metadata.owner"),
        ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: d, namespace: nope}\nspec: {}\n", "metadata.namespace"),
        ("a: [unclosed\n", "f.yaml"),
        ("- 1\n- 2\n", "not a YAML mapping"),
        ("", "no objects"),
    ];
    for (text, want) in cases {
        let err = apply(&model(), text).unwrap_err().to_string();
        assert!(err.contains(want), "{text}\n→ {err}\n(wanted {want:?})");
        assert!(err.starts_with("f.yaml"), "{err}");
    }
}

#[test]
fn a_bad_second_document_refuses_the_whole_manifest() {
    let text = format!("{STRICT}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\n");
    let err = apply(&model(), &text).unwrap_err().to_string();
    assert!(err.contains("document 2"), "{err}");
}

#[test]
fn namespace_labels_are_replaced_and_missing_namespaces_default() {
    let (m, lines) = apply(
        &model(),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: test\n  labels: {istio.io/dataplane-mode: ambient}\n",
    )
    .unwrap();
    assert_eq!(lines, ["namespace/test configured"]);
    assert!(m.in_mesh("test"));
    let (m, _) = apply(&m, &STRICT.replace(", namespace: default", "")).unwrap();
    assert_eq!(m.istio[0]["metadata"]["namespace"], "default");
}

#[test]
fn delete_removes_what_is_there_and_refuses_what_is_not() {
    let (m, _) = apply(&model(), STRICT).unwrap();
    let (m, lines) = change(&m, STRICT, "f.yaml", Verb::Delete).unwrap();
    assert_eq!(
        lines,
        ["peerauthentication.security.istio.io \"default\" deleted"]
    );
    assert!(m.istio.is_empty());
    let err = change(&m, STRICT, "f.yaml", Verb::Delete)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not found"), "{err}");
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: test}\n";
    assert!(change(&m, ns, "f.yaml", Verb::Delete).is_err());
}

#[test]
fn lists_are_read_and_huge_manifests_refused() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n",
        serde_json::to_string(&serde_yaml::from_str::<Value>(STRICT).unwrap()).unwrap()
    );
    let (m, _) = apply(&model(), &list).unwrap();
    assert_eq!(m.istio.len(), 1);
    let many = STRICT.to_string() + &format!("---\n{STRICT}").repeat(300);
    assert!(apply(&model(), &many)
        .unwrap_err()
        .to_string()
        .contains("more than"));
}

#[test]
fn port_level_mtls_survives_the_model_round_trip() {
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pp, namespace: default}\nspec:\n  selector: {matchLabels: {app: productpage}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    9080: {mode: PERMISSIVE}\n";
    let (m, lines) = apply(&model(), text).unwrap();
    assert_eq!(lines, ["peerauthentication.security.istio.io/pp created"]);
    let cfg = MeshConfig::parse(&m.mesh_yaml()).unwrap();
    assert_eq!(cfg.istio.len(), 1);
}

const WAYPOINT: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";

#[test]
fn applying_a_waypoint_gateway_makes_its_pod_and_token_and_deleting_it_removes_them() {
    let (m, lines) = apply(&model(), WAYPOINT).unwrap();
    assert_eq!(
        lines[0],
        "gateway.gateway.networking.k8s.io/waypoint created"
    );
    assert!(
        lines[1].starts_with("pod default/waypoint-0 created on node1"),
        "{lines:?}"
    );
    let pod = m.find_pod("default/waypoint-0").unwrap();
    assert_eq!(pod.service_account, "waypoint");
    assert_eq!(pod.waypoint.as_deref(), Some("waypoint"));
    assert!(!m.captured(pod), "a waypoint's pod is not captured");
    assert!(m.pods.iter().filter(|p| p.ip == pod.ip).count() == 1);
    assert!(m.waypoint_tokens.contains_key("default/waypoint"));
    // The control plane sees a ready waypoint and a token for its identity.
    let cfg = MeshConfig::parse(&m.mesh_yaml()).unwrap();
    assert!(cfg
        .tokens
        .iter()
        .any(|t| t.namespace == "default" && t.service_account == "waypoint"));
    // Applying it again changes nothing, the pod included.
    let (again, lines) = apply(&m, WAYPOINT).unwrap();
    assert_eq!(
        lines,
        ["gateway.gateway.networking.k8s.io/waypoint unchanged"]
    );
    assert_eq!(again, m);
    let (gone, lines) = change(&m, WAYPOINT, "f.yaml", Verb::Delete).unwrap();
    assert_eq!(
        lines,
        [
            "gateway.gateway.networking.k8s.io \"waypoint\" deleted",
            "pod default/waypoint-0 removed (its waypoint Gateway is gone)"
        ]
    );
    assert_eq!(gone.pods, model().pods);
    assert!(gone.waypoint_tokens.is_empty());
}

#[test]
fn routes_and_destination_rules_are_applied_with_their_groups() {
    let text = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080, weight: 80}, {name: reviews-v2, port: 9080, weight: 20}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
";
    let (m, lines) = apply(&model(), text).unwrap();
    assert_eq!(
        lines,
        [
            "httproute.gateway.networking.k8s.io/reviews created",
            "destinationrule.networking.istio.io/reviews created"
        ]
    );
    assert_eq!(MeshConfig::parse(&m.mesh_yaml()).unwrap().istio.len(), 2);
}

#[test]
fn in_two_networks_a_waypoint_is_on_its_nodes_network_and_east_west_gateways_are_not_applied() {
    let m = Model::bookinfo_in(
        "mn",
        BTreeMap::from([("node1".into(), "t".into())]),
        crate::sandbox::Layout::TwoNetworks,
    );
    let (with_waypoint, _) = apply(&m, WAYPOINT).unwrap();
    let pod = with_waypoint.find_pod("default/waypoint-0").unwrap();
    assert_eq!(
        pod.labels
            .get(crate::control_plane::topology::NETWORK_LABEL)
            .map(String::as_str),
        Some("network1")
    );
    let ew = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: eastwest-network1, namespace: istio-system, labels: {topology.istio.io/network: network1}}\nspec:\n  gatewayClassName: istio-east-west\n  listeners: [{name: mesh, port: 15009, protocol: HBONE, tls: {mode: Terminate}}]\n";
    for (verb, model) in [
        (Verb::Apply, &m),
        (Verb::Delete, &m),
        (Verb::Apply, &model()),
    ] {
        let e = change(model, ew, "f.yaml", verb).unwrap_err().to_string();
        assert!(
            e.contains("gatewayClassName") && e.contains("--multi-network"),
            "{e}"
        );
    }
}
