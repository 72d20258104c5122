//! The dump against what `istioctl ztunnel-config` reads: every field its structs decode is checked here by
//! name and JSON type (a Go decoder refuses a number where it expects a string, and so on).

use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::Value;

use super::*;
use crate::config::WorkloadInfo;
use crate::identity::{BuiltinCa, CertManager};
use crate::state::LocalConfig;

const MESH: &str = r#"
workloads:
- uid: Kubernetes//Pod/default/web-1
  name: web-1
  namespace: default
  serviceAccount: web
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  node: node-a
  network: net1
  workloadName: web
  workloadType: deployment
  canonicalName: web
  canonicalRevision: v1
  authorizationPolicies: [default/only-clients]
  waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}
  services:
    default/web.default.svc.cluster.local: {80: 8080}
- uid: Kubernetes//Pod/default/waypoint-1
  name: waypoint-1
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["10.0.0.9"]
  protocol: HBONE
  network: net1
  applicationTunnel: {protocol: PROXY, port: 15088}
  services:
    default/waypoint.default.svc.cluster.local: {15008: 15008}
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  vips: ["net1/10.96.0.10"]
  ports: {80: 8080}
  waypoint: {destination: "net1/10.96.0.99", hboneMtlsPort: 15008}
- name: waypoint
  namespace: default
  hostname: waypoint.default.svc.cluster.local
  vips: ["net1/10.96.0.99"]
  ports: {15008: 15008}
policies:
- name: only-clients
  namespace: default
  scope: WorkloadSelector
  action: Allow
  rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}], [{destinationPorts: [8080]}]]]
"#;

/// JSON types as Go's decoder sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Str,
    Num,
    Bool,
    Obj,
    Arr,
}

fn ty(v: &Value) -> Option<Ty> {
    Some(match v {
        Value::String(_) => Ty::Str,
        Value::Number(_) => Ty::Num,
        Value::Bool(_) => Ty::Bool,
        Value::Object(_) => Ty::Obj,
        Value::Array(_) => Ty::Arr,
        Value::Null => return None,
    })
}

/// Asserts that `obj` has each field with its type.
fn has(what: &str, obj: &Value, fields: &[(&str, Ty)]) {
    for (name, want) in fields {
        let got = obj.get(*name).and_then(ty);
        assert_eq!(got, Some(*want), "{what}.{name} in {obj:#}");
    }
}

/// A port map as istioctl decodes it (`map[uint16]uint16` or `map[string]int`): keys are port numbers in
/// strings, values numbers.
fn port_map(what: &str, v: &Value) -> Vec<(u16, u64)> {
    let map = v.as_object().unwrap_or_else(|| panic!("{what}: {v}"));
    map.iter()
        .map(|(k, v)| {
            let port: u16 = k.parse().unwrap_or_else(|_| panic!("{what} key {k}"));
            (
                port,
                v.as_u64().unwrap_or_else(|| panic!("{what}[{k}]: {v}")),
            )
        })
        .collect()
}

async fn dump() -> Value {
    let state = LocalConfig::parse(MESH).unwrap().into_state().unwrap();
    let certs = CertManager::new(Arc::new(
        BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap(),
    ));
    let id = Identity::new("cluster.local", "default", "web").unwrap();
    let _held = certs.get(&id).await.unwrap();
    let cfg = crate::config::Config::from_source(&std::collections::HashMap::from([
        ("PROXY_MODE", "shared"),
        ("XDS_ADDRESS", ""),
    ]))
    .unwrap();
    let pods = BTreeMap::from([(
        "0b6e4a1c-pod-uid".to_string(),
        PodState {
            info: WorkloadInfo {
                namespace: "default".into(),
                name: "web-1".into(),
                service_account: "web".into(),
            },
            connections: Some(crate::inpod::PodConnections {
                inbound: vec![crate::proxy::connections::Listed {
                    src: "10.0.0.9:40000".parse().unwrap(),
                    original_dst: None,
                    actual_dst: "10.0.0.1:8080".parse().unwrap(),
                    protocol: "HBONE",
                }],
                outbound: vec![crate::proxy::connections::Listed {
                    src: "10.0.0.1:50000".parse().unwrap(),
                    original_dst: Some("10.96.0.10:80".parse().unwrap()),
                    actual_dst: "10.0.0.2:15008".parse().unwrap(),
                    protocol: "HBONE",
                }],
            }),
        },
    )]);
    render(&Sources {
        state: &state,
        certificates: certs.certificates(),
        pods,
        cfg: &cfg,
    })
}

#[tokio::test]
async fn every_field_istioctl_reads_is_there_with_its_json_type() {
    let d = dump().await;
    use Ty::*;
    has(
        "dump",
        &d,
        &[
            ("workloads", Arr),
            ("services", Arr),
            ("policies", Arr),
            ("certificates", Arr),
            ("workloadState", Obj),
            ("config", Obj),
            ("version", Obj),
        ],
    );

    let workloads = d["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 2);
    for w in workloads {
        has(
            "workload",
            w,
            &[
                ("uid", Str),
                ("workloadIps", Arr),
                ("protocol", Str),
                ("name", Str),
                ("namespace", Str),
                ("serviceAccount", Str),
                ("workloadName", Str),
                ("workloadType", Str),
                ("canonicalName", Str),
                ("canonicalRevision", Str),
                ("clusterId", Str),
                ("trustDomain", Str),
                ("locality", Obj),
                ("node", Str),
                ("network", Str),
                ("status", Str),
                ("hostname", Str),
                ("capacity", Num),
                ("authorizationPolicies", Arr),
            ],
        );
        assert!(w["workloadIps"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_string));
    }
    let web = &workloads[1];
    assert_eq!(web["uid"], "Kubernetes//Pod/default/web-1");
    assert_eq!(web["protocol"], "HBONE");
    assert_eq!(web["status"], "Healthy");
    assert_eq!(web["trustDomain"], "cluster.local");
    assert_eq!(web["workloadIps"][0], "10.0.0.1");
    assert_eq!(web["authorizationPolicies"][0], "default/only-clients");
    has(
        "workload.waypoint",
        &web["waypoint"],
        &[("destination", Str)],
    );
    let tunnel = &workloads[0]["applicationTunnel"];
    has(
        "workload.applicationTunnel",
        tunnel,
        &[("protocol", Str), ("port", Num)],
    );

    let services = d["services"].as_array().unwrap();
    assert_eq!(services.len(), 2);
    for s in services {
        has(
            "service",
            s,
            &[
                ("name", Str),
                ("namespace", Str),
                ("hostname", Str),
                ("vips", Arr),
                ("ports", Obj),
                ("endpoints", Obj),
                ("subjectAltNames", Arr),
                ("ipFamilies", Str),
                ("canonical", Bool),
                ("visibility", Str),
                ("loadBalancer", Obj),
            ],
        );
        has(
            "service.loadBalancer",
            &s["loadBalancer"],
            &[
                ("mode", Str),
                ("routingPreferences", Arr),
                ("healthPolicy", Str),
            ],
        );
        // istioctl takes the IP after the network: `network/ip`.
        for vip in s["vips"].as_array().unwrap() {
            let (_, ip) = vip.as_str().unwrap().split_once('/').unwrap();
            ip.parse::<IpAddr>().unwrap();
        }
        port_map("service.ports", &s["ports"]);
        for ep in s["endpoints"].as_object().unwrap().values() {
            has(
                "endpoint",
                ep,
                &[("workloadUid", Str), ("service", Str), ("port", Obj)],
            );
            port_map("endpoint.port", &ep["port"]);
        }
    }
    let web_svc = services.iter().find(|s| s["name"] == "web").unwrap();
    assert_eq!(web_svc["vips"][0], "net1/10.96.0.10");
    assert_eq!(port_map("ports", &web_svc["ports"]), vec![(80, 8080)]);
    assert_eq!(web_svc["ipFamilies"], "IPv4");
    let ep = &web_svc["endpoints"]["Kubernetes//Pod/default/web-1"];
    assert_eq!(ep["workloadUid"], "Kubernetes//Pod/default/web-1");
    assert_eq!(ep["service"], "default/web.default.svc.cluster.local");
    assert_eq!(port_map("port", &ep["port"]), vec![(80, 8080)]);

    // istioctl names a waypoint by matching its destination against `namespace/hostname` or a VIP.
    let names_waypoint = |dest: &Value| {
        services.iter().any(|s| {
            let key = format!(
                "{}/{}",
                s["namespace"].as_str().unwrap(),
                s["hostname"].as_str().unwrap()
            );
            *dest == Value::String(key) || s["vips"].as_array().unwrap().contains(dest)
        })
    };
    assert!(names_waypoint(&web["waypoint"]["destination"]), "{web:#}");
    assert!(
        names_waypoint(&web_svc["waypoint"]["destination"]),
        "{web_svc:#}"
    );

    let policies = d["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    has(
        "policy",
        p,
        &[
            ("name", Str),
            ("namespace", Str),
            ("scope", Str),
            ("action", Str),
            ("rules", Arr),
        ],
    );
    assert_eq!(p["scope"], "WorkloadSelector");
    assert_eq!(p["action"], "Allow");
    // rules: [][][]*match
    let first_match = &p["rules"][0][0][0];
    assert_eq!(
        first_match["principals"][0]["Exact"],
        "cluster.local/ns/default/sa/client"
    );
    assert_eq!(p["rules"][0][1][0]["destinationPorts"][0], 8080);

    let ws = d["workloadState"].as_object().unwrap();
    let pod = &ws["0b6e4a1c-pod-uid"];
    has("workloadState", pod, &[("state", Str), ("info", Obj)]);
    has(
        "workloadState.info",
        &pod["info"],
        &[
            ("name", Str),
            ("namespace", Str),
            ("serviceAccount", Str),
            ("trustDomain", Str),
        ],
    );
    assert_eq!(pod["state"], "Up");
    assert_eq!(pod["info"]["trustDomain"], "cluster.local");
    // `istioctl ztunnel-config connections`: WorkloadConnections' inbound/outbound lists.
    has("workloadState", pod, &[("connections", Obj)]);
    for dir in ["inbound", "outbound"] {
        let list = pod["connections"][dir].as_array().unwrap();
        assert_eq!(list.len(), 1, "{dir}");
        has(
            dir,
            &list[0],
            &[
                ("src", Str),
                ("originalDst", Str),
                ("actualDst", Str),
                ("protocol", Str),
            ],
        );
    }
    let out = &pod["connections"]["outbound"][0];
    assert_eq!(
        (out["originalDst"].as_str(), out["actualDst"].as_str()),
        (Some("10.96.0.10:80"), Some("10.0.0.2:15008"))
    );
    assert_eq!(pod["connections"]["inbound"][0]["originalDst"], "");
}

#[tokio::test]
async fn certificates_show_their_chain_roots_serial_and_validity() {
    let d = dump().await;
    use Ty::*;
    let certs = d["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1);
    let c = &certs[0];
    has(
        "certificate",
        c,
        &[
            ("identity", Str),
            ("state", Str),
            ("certChain", Arr),
            ("rootCerts", Arr),
        ],
    );
    assert_eq!(c["identity"], "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(c["state"], "Available");
    let chain = c["certChain"].as_array().unwrap();
    let roots = c["rootCerts"].as_array().unwrap();
    assert!(!chain.is_empty() && !roots.is_empty(), "{c:#}");
    for cert in chain.iter().chain(roots) {
        has(
            "cert",
            cert,
            &[
                ("pem", Str),
                ("serialNumber", Str),
                ("validFrom", Str),
                ("expirationTime", Str),
            ],
        );
        // istioctl parses the serial as a base-10 big integer, and both times as RFC 3339.
        let serial = cert["serialNumber"].as_str().unwrap();
        assert!(
            !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_digit()),
            "{serial}"
        );
        let parse = |k: &str| {
            time::OffsetDateTime::parse(
                cert[k].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap_or_else(|e| panic!("{k}: {e}"))
        };
        let (from, to) = (parse("validFrom"), parse("expirationTime"));
        let now = time::OffsetDateTime::now_utc();
        assert!(from <= now && now < to, "{cert:#}");
        // The PEM, base64-encoded as ztunnel does, is a certificate.
        let pem = decode_base64(cert["pem"].as_str().unwrap());
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        x509_parser::parse_x509_certificate(&der).unwrap();
    }
    // The leaf expires as the CA issued it: within the hour asked for.
    let leaf_to = time::OffsetDateTime::parse(
        chain[0]["expirationTime"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(leaf_to <= time::OffsetDateTime::now_utc() + Duration::from_secs(3600 + 60));
}

#[test]
fn base64_matches_the_standard_vectors() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), encoded);
        assert_eq!(decode_base64(encoded), plain.as_bytes());
    }
}

/// A plain decoder for the tests (the dump only encodes).
fn decode_base64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}
