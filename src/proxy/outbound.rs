//! Outbound: connections the workload makes, captured on :15001, carried to their destination.
//!
//! Input: an accepted TCP connection and its original destination (`SO_ORIGINAL_DST`). Output: the
//! connection joined to its upstream — through a pooled HBONE tunnel when the destination workload speaks
//! HBONE, plain TCP when it does not, and plain TCP to the original address when the destination is not in
//! the mesh (passthrough). Routing follows ztunnel: a service VIP is load-balanced to an endpoint (none
//! healthy: refused), a workload address goes to that workload.
//!
//! Each routed connection is counted in [`metrics`](crate::metrics) with `reporter="source"`: the source is
//! this proxy's workload (its identity as `source_principal`, and `mutual_tls`, only for HBONE, as
//! ztunnel does), the destination the resolved workload and service (`unknown` for passthrough). The
//! connection counts as opened once routed; `response_flags` is `CONNECT` when the upstream connection or
//! the tunnel (certificate, TLS, CONNECT answer) could not be established, `-` otherwise. Bytes are counted
//! into plain integers by the copy and added at close. Connections refused before routing (self-calls, the
//! local workload unknown, no healthy endpoint) are logged but not counted, as in ztunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Uri, Version};
use rand::Rng;
use tokio::net::TcpStream;

use super::connections::Counted;
use super::{Error, Proxy};
use crate::hbone::copy;
use crate::hbone::pool::PoolKey;
use crate::metrics::{Reporter, ResponseFlags, TrafficLabels};
use crate::socket;
use crate::state::{LbMode, Protocol, Upstream, Workload};

/// Where an outbound connection goes.
#[derive(Debug)]
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
        let route = self.route(&src, dst)?;
        let record = self.metrics().open(source_labels(&src, &route));
        match route {
            Route::Passthrough(addr) | Route::Tcp(Upstream { addr, .. }) => {
                let up = match self.connect_plain(addr).await {
                    Ok(up) => up,
                    Err(e) => {
                        record.close(ResponseFlags::Connect, 0, 0);
                        return Err(e);
                    }
                };
                let mut up = Counted::new(up);
                let res = tokio::io::copy_bidirectional(&mut stream, &mut up).await;
                // Received: from the initiator (written upstream); sent: towards it (read from upstream).
                let (received, sent) = (up.written, up.read);
                record.close(ResponseFlags::None, received, sent);
                res?;
                Ok((addr.to_string(), received, sent))
            }
            Route::Hbone(up) => {
                let hbone_dst = SocketAddr::new(up.addr.ip(), self.cfg().ports.inbound);
                let tunnel: Result<_, Error> = async {
                    let tls = self.tls_for(&src.identity).await?.current();
                    let key = PoolKey {
                        src: src.identity.clone(),
                        dst_ids: up.expected_identities.clone(),
                        dst: hbone_dst,
                    };
                    let req = connect_request(&src, peer, &up);
                    Ok(self.pool().connect(&key, &tls, req).await?)
                }
                .await;
                let tunnel = match tunnel {
                    Ok(t) => t,
                    Err(e) => {
                        record.close(ResponseFlags::Connect, 0, 0);
                        return Err(e);
                    }
                };
                let (r, w) = stream.split();
                let (mut r, mut w) = (Counted::new(r), Counted::new(w));
                let res = copy::bidirectional(&mut r, &mut w, tunnel.send, tunnel.recv).await;
                drop(tunnel.slot);
                let (received, sent) = (r.read, w.written);
                record.close(ResponseFlags::None, received, sent);
                res?;
                Ok((hbone_dst.to_string(), received, sent))
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

    /// A plain TCP connection to `dst` (a workload without HBONE, or outside the mesh).
    async fn connect_plain(&self, dst: SocketAddr) -> Result<TcpStream, Error> {
        socket::connect(
            self.inputs.netns.as_deref(),
            dst,
            None,
            self.inputs.sock,
            &self.cfg().keepalive,
            self.cfg().connect_timeout,
        )
        .await
        .map_err(|source| Error::Connect { dst, source })
    }
}

/// The `reporter="source"` labels of a connection from `src` taking `route`: the source principal (and
/// `mutual_tls`) only when the connection is carried over HBONE, with this workload's certificate.
fn source_labels(src: &Workload, route: &Route) -> TrafficLabels {
    let (identity, up) = match route {
        Route::Hbone(up) => (Some(&src.identity), Some(up)),
        Route::Tcp(up) => (None, Some(up)),
        Route::Passthrough(_) => (None, None),
    };
    TrafficLabels::new(
        Reporter::source,
        Some(src),
        identity,
        up.map(|u| &*u.workload),
        up.and_then(|u| u.service.as_deref()),
    )
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
