//! Outbound: connections the workload makes, captured on :15001, carried to their destination.
//!
//! Input: an accepted TCP connection and its original destination (`SO_ORIGINAL_DST`). Output: the
//! connection joined to its upstream — through a pooled HBONE tunnel when the destination workload speaks
//! HBONE, plain TCP when it does not, and plain TCP to the original address when the destination is not in
//! the mesh (passthrough). Routing follows ztunnel: a service VIP is load-balanced to an endpoint (none
//! healthy: refused), a workload address goes to that workload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Uri, Version};
use rand::Rng;
use tokio::net::TcpStream;

use super::{Error, Proxy};
use crate::hbone::copy;
use crate::hbone::pool::PoolKey;
use crate::socket;
use crate::state::{LbMode, Protocol, Upstream, Workload};

/// Where an outbound connection goes.
enum Route {
    /// HBONE to the upstream's proxy.
    Hbone(Upstream),
    /// Plain TCP to a mesh workload that does not speak HBONE.
    Tcp(Upstream),
    /// Plain TCP to an address outside the mesh.
    Passthrough(SocketAddr),
}

impl Proxy {
    /// Handles one connection accepted on :15001.
    pub(super) async fn outbound(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let dst = match socket::original_dst(&stream) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(target: "access", direction = "outbound", src.addr = %peer, error = %Error::OriginalDst(e), "connection failed");
                return;
            }
        };
        self.outbound_to(stream, peer, dst).await;
    }

    /// Carries `stream` from `peer` to its original destination `dst`. Public so that embedders and tests
    /// can hand over connections they captured some other way.
    pub async fn outbound_to(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        let start = Instant::now();
        match self.outbound_inner(stream, peer, dst).await {
            Ok((route, sent, recv)) => {
                tracing::info!(
                    target: "access", direction = "outbound",
                    src.addr = %peer,
                    dst.addr = %route,
                    dst.hbone_addr = %dst,
                    bytes_sent = sent,
                    bytes_recv = recv,
                    duration = format!("{}ms", start.elapsed().as_millis()),
                    "connection complete"
                );
            }
            Err(e) => {
                tracing::warn!(target: "access", direction = "outbound", src.addr = %peer, dst.addr = %dst, error = %e, "connection failed");
            }
        }
    }

    async fn outbound_inner(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Result<(String, u64, u64), Error> {
        if dst.ip().is_loopback() && self.cfg().ports.illegal().contains(&dst.port()) {
            return Err(Error::SelfCall(dst));
        }
        let src = self.local_workload().await?;
        match self.route(&src, dst)? {
            Route::Passthrough(addr) | Route::Tcp(Upstream { addr, .. }) => {
                let (sent, recv) = self.plain_tcp(&mut stream, addr).await?;
                Ok((addr.to_string(), sent, recv))
            }
            Route::Hbone(up) => {
                let hbone_dst = SocketAddr::new(up.addr.ip(), self.cfg().ports.inbound);
                let tls = self.tls_for(&src.identity).await?.current();
                let key = PoolKey {
                    src: src.identity.clone(),
                    dst_ids: up.expected_identities.clone(),
                    dst: hbone_dst,
                };
                let req = connect_request(&src, peer, &up);
                let tunnel = self.pool().connect(&key, &tls, req).await?;
                let (mut r, mut w) = stream.split();
                let t = copy::bidirectional(&mut r, &mut w, tunnel.send, tunnel.recv).await?;
                drop(tunnel.slot);
                Ok((hbone_dst.to_string(), t.tcp_to_hbone, t.hbone_to_tcp))
            }
        }
    }

    fn route(&self, src: &Workload, dst: SocketAddr) -> Result<Route, Error> {
        let state = self.inputs.state.load();
        let network = &self.cfg().network;
        if let Some(svc) = state.service_by_vip(network, dst.ip(), &src.namespace) {
            if svc.lb_mode == LbMode::Passthrough {
                return Ok(match state.workload_by_addr(network, dst.ip()) {
                    Some(w) => by_protocol(state.upstream(w.clone(), dst, Some(svc.clone()))),
                    None => Route::Passthrough(dst),
                });
            }
            return state
                .pick_endpoint(svc, dst.port(), dst.ip())
                .map(by_protocol)
                .ok_or_else(|| Error::NoHealthyUpstream {
                    service: svc.key(),
                    port: dst.port(),
                });
        }
        Ok(match state.workload_by_addr(network, dst.ip()) {
            Some(w) => by_protocol(state.upstream(w.clone(), dst, None)),
            None => Route::Passthrough(dst),
        })
    }

    async fn plain_tcp(
        &self,
        stream: &mut TcpStream,
        dst: SocketAddr,
    ) -> Result<(u64, u64), Error> {
        let mut up = socket::connect(
            self.inputs.netns.as_deref(),
            dst,
            None,
            self.inputs.sock,
            self.cfg().connect_timeout,
        )
        .await
        .map_err(|source| Error::Connect { dst, source })?;
        Ok(tokio::io::copy_bidirectional(stream, &mut up).await?)
    }
}

fn by_protocol(up: Upstream) -> Route {
    match up.workload.protocol {
        Protocol::HBONE => Route::Hbone(up),
        Protocol::TCP => Route::Tcp(up),
    }
}

/// The CONNECT request ztunnel sends: `:authority` = upstream `ip:port`, and `forwarded`, `baggage`,
/// `traceparent` headers.
pub fn connect_request(src: &Workload, client: SocketAddr, up: &Upstream) -> Request<()> {
    let authority = up.addr.to_string();
    let mut forwarded = format!("for=\"{client}\"");
    if let Some(svc) = &up.service {
        forwarded.push_str(";host=");
        forwarded.push_str(&svc.hostname);
    }
    let mut rng = rand::rng();
    let traceparent = format!(
        "00-{:032x}-{:016x}-00",
        rng.random::<u128>(),
        rng.random::<u64>()
    );
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(Uri::try_from(authority.as_str()).expect("a socket address is a valid authority"))
        .version(Version::HTTP_2)
        .body(())
        .expect("CONNECT request is valid");
    let h = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        h.insert("forwarded", v);
    }
    if let Ok(v) = HeaderValue::from_str(&baggage(src)) {
        h.insert("baggage", v);
    }
    if let Ok(v) = HeaderValue::from_str(&traceparent) {
        h.insert("traceparent", v);
    }
    req
}

/// ztunnel's baggage header for a workload (empty fields omitted).
pub fn baggage(w: &Workload) -> String {
    let kind = if w.workload_type.is_empty() {
        "pod"
    } else {
        w.workload_type.as_str()
    };
    let workload_name = if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    };
    let fields = [
        ("k8s.cluster.name", w.cluster_id.as_str()),
        ("k8s.namespace.name", w.namespace.as_str()),
        (&*format!("k8s.{kind}.name"), workload_name.as_str()),
        ("service.name", w.canonical_name.as_str()),
        ("service.version", w.canonical_revision.as_str()),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k}={v}"))
    .collect::<Vec<_>>();
    fields.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LocalConfig;

    #[test]
    fn connect_request_is_what_ztunnel_sends() {
        let st = LocalConfig::parse(
            r#"
workloads:
- {uid: c, name: sleep-7d9f, namespace: default, serviceAccount: sleep, workloadIps: ["10.0.0.1"],
   workloadName: sleep, workloadType: deployment, canonicalName: sleep, canonicalRevision: v1, clusterId: c1}
- {uid: s, name: web, namespace: default, workloadIps: ["10.0.0.2", "fd00::2"], protocol: HBONE,
   services: {"default/web.default.svc.cluster.local": {80: 8080}}}
services:
- {name: web, namespace: default, hostname: web.default.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 8080}}
"#,
        )
        .unwrap()
        .into_state()
        .unwrap();
        let src = st
            .workload_by_addr("", "10.0.0.1".parse().unwrap())
            .unwrap()
            .clone();
        let svc = st
            .service_by_vip("", "10.96.0.1".parse().unwrap(), "default")
            .unwrap()
            .clone();
        let up = st
            .pick_endpoint(&svc, 80, "10.96.0.1".parse().unwrap())
            .unwrap();
        let req = connect_request(&src, "10.0.0.1:40000".parse().unwrap(), &up);
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.0.0.2:8080");
        assert!(req.uri().scheme().is_none() && req.uri().path_and_query().is_none());
        let h = req.headers();
        assert_eq!(
            h["forwarded"],
            "for=\"10.0.0.1:40000\";host=web.default.svc.cluster.local"
        );
        assert_eq!(
            h["baggage"],
            "k8s.cluster.name=c1,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1"
        );
        let tp = h["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");

        // IPv6 authorities are bracketed.
        let w = st
            .workload_by_addr("", "fd00::2".parse().unwrap())
            .unwrap()
            .clone();
        let up6 = st.upstream(w, "[fd00::2]:8080".parse().unwrap(), None);
        let req6 = connect_request(&src, "[fd00::1]:1".parse().unwrap(), &up6);
        assert_eq!(req6.uri().to_string(), "[fd00::2]:8080");
        assert_eq!(req6.headers()["forwarded"], "for=\"[fd00::1]:1\"");
    }
}
