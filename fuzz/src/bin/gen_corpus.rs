//! Writes the seed corpora: `gen_corpus <dir>` creates `<dir>/<target>/seed-*` for every target. Seeds are
//! real inputs: the CNI config and prevResult a runtime passes, the event the plugin posts, xDS resources
//! the embedded control plane translates from the test meshes and the sandbox's bookinfo, a CSR and a
//! CA-signed chain, HBONE CONNECT frames, the config files from the tests and the docs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshnode::control_plane::config::MeshConfig;
use meshnode::control_plane::translate::translate;
use meshnode::fuzzing::zds_server_flags::{DEL, FD, UNASKED};
use meshnode::fuzzing::{FUZZ_IDENTITY, FUZZ_KEY_PEM};
use meshnode::identity::{BuiltinCa, CsrSigner};
use meshnode::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use meshnode::proto::workload::zds::{
    workload_request::Payload, workload_response, Ack, AddWorkload, DelWorkload, KeepWorkload,
    SnapshotSent, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use prost::Message;

struct Out {
    root: PathBuf,
}

impl Out {
    fn put(&self, target: &str, name: &str, bytes: impl AsRef<[u8]>) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
    }
}

const PREV_RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"0a:58:0a:01:00:05","sandbox":"/var/run/netns/pod"}],"ips":[{"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":0},{"address":"fd00::5/64","interface":0}],"routes":[{"dst":"0.0.0.0/0","gw":"10.1.0.1"}],"dns":{"nameservers":["10.96.0.10"]}}"#;

const LOCAL_CONFIG: &str = r#"workloads:
- uid: cluster1//v1/Pod/default/server-a
  name: server-a
  namespace: default
  serviceAccount: server
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  node: node-1
  services:
    "default/server.default.svc.cluster.local": {80: 8080}
- uid: cluster1//v1/Pod/default/sick
  name: sick
  namespace: default
  workloadIps: ["10.0.0.4"]
  status: Unhealthy
  capacity: 3
- uid: cluster1//v1/Pod/other/plain
  name: plain
  namespace: other
  trustDomain: example.org
  workloadIps: ["10.0.0.5", "fd00::5"]
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8000}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/extra"]
policies:
- name: allow-nothing-special
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{destinationPorts: [9999]}]]]
- name: allow-sleep
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact "cluster.local/ns/test/sa/sleep"]
        sourceIps: ["10.1.0.0/16"]
        notDestinationPorts: [9999]
        serviceAccounts: [{namespace: test, serviceAccount: sleep}]
        notPrincipals: [!Presence []]
"#;

const ENROLLMENT: &str = r#"namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
  test: {}
pods:
- {name: productpage, namespace: default, serviceAccount: productpage, labels: {app: productpage}}
- {name: legacy, namespace: default, labels: {istio.io/dataplane-mode: none}}
"#;

const MESH: &str = r#"namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
  test: {}
  kube-system: {labels: {istio.io/dataplane-mode: ambient}}
workloads:
- {name: productpage-v1, namespace: default, serviceAccount: productpage, ips: [10.1.0.5], node: node-1, labels: {app: productpage, version: v1}}
- {name: opted-out, namespace: default, ips: [10.1.0.6], node: node-1, labels: {istio.io/dataplane-mode: none, app: productpage}}
- {name: sleep, namespace: test, serviceAccount: sleep, ips: [10.1.0.7], node: node-2, labels: {istio.io/dataplane-mode: ambient, service.istio.io/canonical-name: sleepy, app: sleep}}
- {name: plain, namespace: test, ips: [10.1.0.8]}
services:
- {name: productpage, namespace: default, vips: [10.96.0.10], ports: [{port: 9080, targetPort: 9081}, {port: 80}], selector: {app: productpage}}
- {name: external, namespace: default, vips: ["fd00::10", 10.96.0.11], ports: [{port: 443}]}
policies:
- name: allow-sleep
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact "cluster.local/ns/test/sa/sleep"]
        sourceIps: ["10.1.0.0/16"]
        notDestinationPorts: [9999]
        serviceAccounts: [{namespace: test, serviceAccount: sleep}]
        notPrincipals: [!Presence []]
tokens:
- {token: node-1-secret, nodeProxy: true, node: node-1}
- {token: sleep-secret, namespace: test, serviceAccount: sleep}
istio:
- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: viewer, namespace: default}, spec: {selector: {matchLabels: {app: productpage}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/test/sa/sleep], namespaces: ["te*"], ipBlocks: [10.1.0.0/16]}}], to: [{operation: {ports: ["9080"]}}], when: [{key: source.ip, values: [10.1.0.7]}]}]}}
- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: deny-bots, namespace: test}, spec: {action: DENY, rules: [{from: [{source: {notPrincipals: ["*"]}}]}]}}
- {apiVersion: security.istio.io/v1beta1, kind: PeerAuthentication, metadata: {name: strict, namespace: default}, spec: {mtls: {mode: STRICT}}}
- {apiVersion: security.istio.io/v1beta1, kind: PeerAuthentication, metadata: {name: pp, namespace: default}, spec: {selector: {matchLabels: {app: productpage}}, mtls: {mode: STRICT}, portLevelMtls: {"9080": {mode: PERMISSIVE}}}}
"#;

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK "literal without indexing", name from the static table (index < 15) or literal (index 0).
fn hpack(index: u8, name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![index];
    if index == 0 {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
    }
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
    out
}

fn h2_request(method: &str, authority: &str, extra: &[(&str, &str)], data: &[u8]) -> Vec<u8> {
    let mut block = hpack(2, "", method); // :method
    block.extend(hpack(1, "", authority)); // :authority
    for (k, v) in extra {
        block.extend(hpack(0, k, v));
    }
    let mut out = frame(4, 0, 0, &[]); // SETTINGS
    out.extend(frame(4, 1, 0, &[])); // SETTINGS ack
    out.extend(frame(1, 4, 1, &block)); // HEADERS, END_HEADERS
    if !data.is_empty() {
        out.extend(frame(0, 1, 1, data)); // DATA, END_STREAM
    }
    out
}

/// ZDS target framing: `[flags][len u16 LE][message]`.
fn zds(flags: u8, req: &impl Message) -> Vec<u8> {
    let bytes = req.encode_to_vec();
    let mut out = vec![flags];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend(bytes);
    out
}

/// A DNS query: id 0x1234, RD, one question `name` of type `qtype`, class IN; with an EDNS OPT record
/// (1232-byte payload) when `edns`.
fn dns_query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    if edns {
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    q
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let out = Out { root };

    // CNI plugin stdin: an ambient conflist entry as containerd passes it, with and without prevResult.
    let conf = |version: &str, prev: Option<&str>| {
        let mut s = format!(
            r#"{{"cniVersion":"{version}","name":"k8s-pod-network","type":"meshnode-cni","cni_agent_run_dir":"/var/run/meshnode","exclude_namespaces":["kube-system"],"pod_namespace":"istio-system","ambient_enabled":true,"plugin_log_level":"debug""#
        );
        if let Some(p) = prev {
            s.push_str(r#","prevResult":"#);
            s.push_str(p);
        }
        s.push('}');
        s
    };
    out.put("cni_stdin", "add-1.0.0", conf("1.0.0", Some(PREV_RESULT)));
    out.put(
        "cni_stdin",
        "add-0.3.1",
        conf(
            "0.3.1",
            Some(&PREV_RESULT.replace(
                r#""address":"10.1.0.5/24""#,
                r#""version":"4","address":"10.1.0.5/24""#,
            )),
        ),
    );
    out.put("cni_stdin", "version-only", conf("1.1.0", None));
    out.put(
        "cni_stdin",
        "gc",
        r#"{"cniVersion":"1.1.0","name":"n","type":"meshnode-cni","cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
    );

    // CNI plugin environment.
    out.put(
        "cni_env",
        "add",
        "CNI_COMMAND=ADD\nCNI_CONTAINERID=4f0c1d3e9b2a\nCNI_NETNS=/var/run/netns/cni-1234\nCNI_IFNAME=eth0\nCNI_PATH=/opt/cni/bin\nCNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=productpage-v1;K8S_POD_INFRA_CONTAINER_ID=4f0c1d3e9b2a;K8S_POD_UID=0b6e4a52-1d7c-4c1e-9a3f-1f2e3d4c5b6a\n",
    );
    out.put(
        "cni_env",
        "del",
        "CNI_COMMAND=DEL\nCNI_CONTAINERID=abc\nCNI_IFNAME=eth0\n",
    );
    out.put("cni_env", "version", "CNI_COMMAND=VERSION\n");

    // The agent's answers to the plugin.
    let body = r#"{"enrolled":true,"reason":"namespace default is ambient"}"#;
    out.put(
        "cni_agent_answer",
        "content-length",
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    );
    out.put(
        "cni_agent_answer",
        "chunked",
        format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        ),
    );
    out.put(
        "cni_agent_answer",
        "error",
        "HTTP/1.0 503 Service Unavailable\r\n\r\nthe agent is shutting down",
    );

    // Plugin → agent requests.
    let event = r#"{"Netns":"/var/run/netns/cni-1234","PodName":"productpage-v1","PodNamespace":"default","PodUID":"0b6e4a52","ContainerID":"4f0c1d3e9b2a","IfName":"eth0","IPs":[{"Address":{"IP":"10.1.0.5","Mask":"////AA=="},"Gateway":"10.1.0.1"}]}"#;
    for path in ["cmdadd", "cmddel"] {
        out.put(
            "plugin_request",
            path,
            format!("POST /{path} HTTP/1.1\r\nHost: meshnode-agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{event}", event.len()),
        );
    }
    out.put(
        "plugin_request",
        "gc",
        "POST /cmdgc HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"IPs\":null,\"x\":1}  ",
    );

    // ZDS: a snapshot (add with netns fd, keep, done) then a delete.
    let info = WorkloadInfo {
        name: "productpage-v1".into(),
        namespace: "default".into(),
        service_account: "productpage".into(),
    };
    let req = |p: Payload| WorkloadRequest { payload: Some(p) };
    let mut snapshot = zds(
        1,
        &req(Payload::Add(AddWorkload {
            uid: "0b6e4a52".into(),
            workload_info: Some(info),
        })),
    );
    snapshot.extend(zds(
        0,
        &req(Payload::Keep(KeepWorkload { uid: "77aa".into() })),
    ));
    snapshot.extend(zds(0, &req(Payload::SnapshotSent(SnapshotSent {}))));
    snapshot.extend(zds(
        0,
        &req(Payload::Del(DelWorkload {
            uid: "0b6e4a52".into(),
        })),
    ));
    out.put("zds_client", "snapshot", snapshot);
    out.put(
        "zds_client",
        "fd-with-del",
        zds(2, &req(Payload::Del(DelWorkload { uid: "x".into() }))),
    );

    // Configuration files, and xDS resources as the control plane translates them.
    out.put("local_config", "test-config", LOCAL_CONFIG);
    out.put("agent_enrollment", "doc-example", ENROLLMENT);
    let bookinfo = meshnode::sandbox::model::Model::bookinfo("fz", BTreeMap::new()).mesh_yaml();
    out.put("mesh_config", "test-mesh", MESH);
    out.put("mesh_config", "sandbox-bookinfo", &bookinfo);
    let mut seen_kinds = BTreeMap::new();
    for (label, text) in [("test", MESH), ("bookinfo", bookinfo.as_str())] {
        let cfg = MeshConfig::parse(text).expect("seed mesh parses");
        let resources = translate(&cfg);
        for (i, (name, addr)) in resources.addresses.iter().enumerate() {
            let kind = match &addr.r#type {
                Some(meshnode::proto::workload::address::Type::Workload(_)) => "workload",
                Some(meshnode::proto::workload::address::Type::Service(_)) => "service",
                None => "empty",
            };
            // A few of each kind is enough: the rest differ only in names.
            let n = seen_kinds.entry(kind).or_insert(0);
            *n += 1;
            if *n > 4 {
                continue;
            }
            let mut bytes = format!("{name}\n").into_bytes();
            bytes.extend(addr.encode_to_vec());
            out.put("xds_address", &format!("{label}-{kind}-{i}"), bytes);
        }
        for (i, (name, auth)) in resources.authorizations.iter().enumerate().take(6) {
            let mut bytes = format!("{name}\n").into_bytes();
            bytes.extend(auth.encode_to_vec());
            out.put("xds_authorization", &format!("{label}-{i}"), bytes);
        }
    }

    // CA: a CSR for the fixed key, the request carrying it, and a chain signed for it.
    let key = rcgen::KeyPair::from_pem(FUZZ_KEY_PEM).expect("fixed key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        FUZZ_IDENTITY.try_into().expect("an ia5 string"),
    )];
    let csr = params
        .serialize_request(&key)
        .expect("CSR")
        .pem()
        .expect("CSR PEM");
    out.put(
        "ca_request",
        "plain",
        IstioCertificateRequest {
            csr: csr.clone(),
            validity_duration: 3600,
            metadata: None,
        }
        .encode_to_vec(),
    );
    let metadata = prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(FUZZ_IDENTITY.into())),
            },
        )]
        .into(),
    };
    out.put(
        "ca_request",
        "impersonated",
        IstioCertificateRequest {
            csr: csr.clone(),
            validity_duration: 0,
            metadata: Some(metadata),
        }
        .encode_to_vec(),
    );
    // Ten years: the seed keeps reaching chain verification instead of stopping at "expired".
    let ttl = Duration::from_secs(10 * 365 * 24 * 3600);
    let ca = BuiltinCa::ephemeral(ttl).expect("in-memory CA");
    let id = FUZZ_IDENTITY.parse().expect("SPIFFE id");
    let chain = ca.sign_csr(&csr, &id, ttl).expect("signed");
    out.put(
        "ca_answer",
        "signed-chain",
        IstioCertificateResponse {
            cert_chain: chain.clone(),
        }
        .encode_to_vec(),
    );
    out.put(
        "ca_answer",
        "one-pem-blob",
        IstioCertificateResponse {
            cert_chain: vec![chain.concat()],
        }
        .encode_to_vec(),
    );

    // HBONE CONNECT streams.
    out.put(
        "hbone_connect",
        "connect-ip",
        h2_request(
            "CONNECT",
            "10.0.0.2:8080",
            &[("forwarded", "for=\"10.1.0.7:43210\"")],
            b"hello",
        ),
    );
    out.put(
        "hbone_connect",
        "connect-host",
        h2_request(
            "CONNECT",
            "productpage.default.svc.cluster.local:9080",
            &[],
            b"",
        ),
    );
    out.put(
        "hbone_connect",
        "connect-v6",
        h2_request(
            "CONNECT",
            "[fd00::5]:80",
            &[("forwarded", "for=\"[fd00::7]:1\"")],
            b"",
        ),
    );
    out.put(
        "hbone_connect",
        "get",
        h2_request("GET", "10.0.0.2:8080", &[], b""),
    );

    // Admin ports.
    out.put(
        "admin_http",
        "ready",
        "GET /healthz/ready HTTP/1.1\r\nHost: 10.1.0.5:15021\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\n\r\n",
    );
    out.put(
        "admin_http",
        "metrics",
        "GET /metrics HTTP/1.1\r\nHost: 10.1.0.5:15020\r\nAccept: text/plain;version=0.0.4\r\n\r\n",
    );
    out.put("admin_http", "post", "POST / HTTP/1.0\r\n\r\n");

    // The agent's side of ZDS: the proxy's hello, then its acks (an empty error) and NACKs.
    let hello = zds(
        0,
        &ZdsHello {
            version: Version::V1 as i32,
        },
    );
    let ack = |flags: u8, error: &str| {
        zds(
            flags,
            &WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(Ack {
                    error: error.into(),
                })),
            },
        )
    };
    let nack =
        "pod uid-a: binding :15008 in netns 4026532291: Address already in use (os error 98)";
    let seq = |parts: &[Vec<u8>]| parts.concat();
    // Two snapshot pods and SnapshotSent acked, then an add and a del acked.
    out.put(
        "zds_server",
        "snapshot-add-del",
        seq(&[
            hello.clone(),
            ack(0, ""),
            ack(0, ""),
            ack(0, ""),
            ack(0, ""),
            ack(DEL, ""),
        ]),
    );
    // A pod refused in the snapshot and later (the connection stays), then a del acked.
    out.put(
        "zds_server",
        "nacks",
        seq(&[
            hello.clone(),
            ack(0, nack),
            ack(0, ""),
            ack(0, ""),
            ack(0, nack),
            ack(DEL, ""),
        ]),
    );
    // Data the agent did not ask for, while it waits for nothing.
    out.put(
        "zds_server",
        "unasked",
        seq(&[
            hello.clone(),
            ack(0, ""),
            ack(0, ""),
            ack(0, ""),
            ack(UNASKED, ""),
        ]),
    );
    // An ack carrying an fd; a hello of an unknown version.
    out.put("zds_server", "ack-with-fd", seq(&[hello, ack(FD, "")]));
    out.put("zds_server", "hello-v0", zds(0, &ZdsHello { version: 0 }));

    // The plugin's hint file: `namespace\nnow\n<file>`.
    let hint = r#"{"version":2,"validUntil":1767225600,"excludedNamespaces":["kube-system","istio-system"],"passThroughNamespaces":["legacy","monitoring"],"ambientNamespaces":["default","bookinfo"]}"#;
    out.put(
        "plugin_hint",
        "pass-through",
        format!("legacy\n1767225000\n{hint}"),
    );
    out.put(
        "plugin_hint",
        "stale",
        format!("legacy\n1767229999\n{hint}"),
    );
    out.put(
        "plugin_hint",
        "excluded",
        format!("kube-system\n1900000000\n{hint}"),
    );
    out.put(
        "plugin_hint",
        "ambient",
        format!("bookinfo\n1767225000\n{hint}"),
    );
    out.put(
        "plugin_hint",
        "unlisted",
        format!("new-team\n1767225000\n{hint}"),
    );
    out.put(
        "plugin_hint",
        "version-1",
        r#"legacy
1767225000
{"excludedNamespaces":["kube-system"],"ambientNamespaces":["default"]}"#,
    );

    // Inbound CONNECT request heads (`METHOD AUTHORITY [PEER]` then headers) against the target's mesh.
    for (name, head) in [
        (
            "service",
            "CONNECT server.default.svc.cluster.local:80\nforwarded: for=\"127.0.0.88:51234\"\n",
        ),
        ("closed-port", "CONNECT 127.0.0.77:8081\n"),
        ("denied-port", "CONNECT 127.0.0.77:9090\n"),
        ("self-call", "CONNECT 127.0.0.77:15008\n"),
        ("self-call-service", "CONNECT loop.default.svc.cluster.local:81\n"),
        ("no-target-port", "CONNECT server.default.svc.cluster.local:8443\n"),
        ("other-ip", "CONNECT 10.0.0.9:8080\n"),
        ("v4-mapped", "CONNECT [::ffff:127.0.0.77]:8081\n"),
        (
            "stranger",
            "CONNECT server.default.svc.cluster.local:80 spiffe://cluster.local/ns/default/sa/intruder\n",
        ),
        (
            "forwarded-other",
            "CONNECT server.default.svc.cluster.local:80\nforwarded: for=\"[fd00::9]:1\";proto=https\nbaggage: k8s.cluster.name=c1\n",
        ),
        ("get", "GET 127.0.0.77:8081\n"),
    ] {
        out.put("check_connect", name, head);
    }

    // DNS queries as a pod's resolver sends them: mesh names (short, full, a wildcard host, a headless
    // service too large for UDP, a search-domain expansion), AAAA, a type that is forwarded.
    for (name, qname, qtype, edns) in [
        ("a-short", "reviews", 1u16, false),
        ("a-full-edns", "reviews.default.svc.cluster.local", 1, true),
        ("aaaa", "reviews.default", 28, false),
        ("wildcard", "www.example.com", 1, false),
        ("headless-large", "db", 1, false),
        (
            "search-expanded",
            "www.example.com.default.svc.cluster.local",
            1,
            true,
        ),
        ("mx-forwarded", "reviews", 15, false),
    ] {
        out.put("dns_query", name, dns_query(qname, qtype, edns));
    }
}
