//! A labelled mesh on loopback for the metrics and live-authorization tests: client (HBONE, canonical
//! name/revision, cluster `cluster1`) at .2, server (HBONE, echo apps on :8080 and :9090) at .3 behind the
//! service VIP .100:80 → 8080, and a plain-TCP `legacy` workload at .4, each with a dedicated proxy in this
//! process sharing one ephemeral CA.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshnode::identity::BuiltinCa;

use super::{echo_server, ip, loopback_net, start_proxy, TestProxy};

/// Certificate lifetime: long enough never to rotate during a test.
const TTL: Duration = Duration::from_secs(3600);

/// The local config of the mesh in `net`, with `server_policies` (a YAML list) as its policies.
pub fn labelled_mesh_yaml(net: [u8; 2], server_policies: &str) -> String {
    let ip = |h| ip(net, h);
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client-7d4f
  namespace: default
  serviceAccount: client
  workloadName: client
  canonicalName: client
  canonicalRevision: v1
  clusterId: cluster1
  workloadIps: ["{c}"]
  protocol: HBONE
- uid: cluster1//v1/Pod/default/server
  name: server-5c9b
  namespace: default
  serviceAccount: server
  workloadName: server
  canonicalName: server
  canonicalRevision: v2
  workloadIps: ["{s}"]
  protocol: HBONE
  services:
    "default/server.default.svc.cluster.local": {{80: 8080}}
- uid: cluster1//v1/Pod/legacy/legacy
  name: legacy
  namespace: legacy
  workloadIps: ["{t}"]
  protocol: TCP
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["/{vip}"]
  ports: {{80: 8080}}
policies: {server_policies}
"#,
        c = ip(2),
        s = ip(3),
        t = ip(4),
        vip = ip(100),
    )
}

/// The running mesh.
pub struct LabelledMesh {
    /// Its loopback /24.
    pub net: [u8; 2],
    /// The client workload's proxy.
    pub client: TestProxy,
    /// The server workload's proxy.
    pub server: TestProxy,
}

/// Starts both proxies (policies `server_policies`) and the server's echo apps.
pub async fn labelled_mesh(server_policies: &str) -> LabelledMesh {
    let net = loopback_net();
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let yaml = labelled_mesh_yaml(net, server_policies);
    let client = start_proxy(
        ca.clone(),
        &yaml,
        "default/client-7d4f/client",
        ip(net, 2),
        &[],
    )
    .await;
    let server = start_proxy(ca, &yaml, "default/server-5c9b/server", ip(net, 3), &[]).await;
    echo_server(SocketAddr::new(ip(net, 3), 8080)).await;
    echo_server(SocketAddr::new(ip(net, 3), 9090)).await;
    LabelledMesh {
        net,
        client,
        server,
    }
}

/// The value of the one sample of `name` (OpenMetrics text) whose labels contain every `label="value"` in
/// `labels`; `None` when there is none, a panic when several match.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<u64> {
    let found: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        found.len() <= 1,
        "several samples of {name} match {labels:?}:\n{text}"
    );
    found.first().copied()
}
