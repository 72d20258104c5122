//! Inbound HBONE (:15008): mTLS with the local workload's certificate, then one CONNECT per tunnelled TCP
//! connection, checked, authorized and joined to the application.
//!
//! Input: an accepted TCP connection. Output: each CONNECT stream answered with ztunnel's statuses —
//! 400 when the method is not CONNECT, the authority does not parse or names an address other than the one
//! the connection arrived on; 503 when the local workload is unknown, the port is one of the proxy's own,
//! or the application cannot be reached; 401 when authorization denies; 200 and bytes both ways otherwise.
//! TLS failures (garbage, plain HTTP, untrusted or foreign certificates) end that connection only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{Method, StatusCode};
use tokio::net::TcpStream;

use super::{Error, Proxy};
use crate::authz::{Connection, Decision};
use crate::hbone::{copy, server};
use crate::identity::Identity;
use crate::socket;

/// Why a CONNECT stream was refused, and with which status.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

impl Proxy {
    /// Handles one connection accepted on :15008.
    pub(super) async fn inbound(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let local = match stream.local_addr() {
            Ok(a) => socket::canonical(a),
            Err(_) => return,
        };
        let tls = match self.local_workload().await {
            Ok(w) => match self.tls_for(&w.identity).await {
                Ok(t) => t.current(),
                Err(e) => {
                    tracing::warn!(src.addr = %peer, error = %e, "inbound connection refused");
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(src.addr = %peer, error = %e, "inbound connection refused");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let tls_stream = match tokio::time::timeout(
            self.cfg().handshake_timeout,
            acceptor.accept(stream),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(target: "access", direction = "inbound", src.addr = %peer, dst.addr = %local, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(target: "access", direction = "inbound", src.addr = %peer, dst.addr = %local, "TLS handshake timed out");
                return;
            }
        };
        let Some(peer_id) = crate::tls::peer_identity(tls_stream.get_ref().1.peer_certificates())
        else {
            // The verifier only admits certificates with a SPIFFE SAN; this is defence in depth.
            tracing::warn!(src.addr = %peer, "peer certificate has no SPIFFE identity");
            return;
        };
        let me = self.clone();
        let shutdown = self.shutdown.clone();
        let res = server::serve(tls_stream, &self.cfg().h2, shutdown, move |incoming| {
            let me = me.clone();
            let peer_id = peer_id.clone();
            async move { me.inbound_stream(incoming, peer, local, peer_id).await }
        })
        .await;
        if let Err(e) = res {
            tracing::debug!(src.addr = %peer, error = %e, "HBONE connection ended with an error");
        }
    }

    async fn inbound_stream(
        self: Arc<Self>,
        incoming: server::Incoming,
        peer: SocketAddr,
        local: SocketAddr,
        peer_id: Identity,
    ) {
        let start = Instant::now();
        let authority = incoming
            .request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let upstream = match self.check_connect(&incoming, peer, local, &peer_id).await {
            Ok(up) => up,
            Err(r) => {
                tracing::info!(
                    target: "access", direction = "inbound",
                    src.addr = %peer, src.identity = %peer_id, dst.addr = %local, dst.hbone_addr = %authority,
                    status = r.status.as_u16(), error = %r.reason, "connection refused"
                );
                incoming.refuse(r.status);
                return;
            }
        };
        let (send, recv) = match incoming.accept(http::HeaderMap::new()) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "HBONE stream gone before the answer");
                return;
            }
        };
        let mut upstream = upstream;
        let (mut r, mut w) = upstream.split();
        match copy::bidirectional(&mut r, &mut w, send, recv).await {
            Ok(t) => tracing::info!(
                target: "access", direction = "inbound",
                src.addr = %peer, src.identity = %peer_id, dst.addr = %local, dst.hbone_addr = %authority,
                bytes_sent = t.hbone_to_tcp, bytes_recv = t.tcp_to_hbone,
                duration = format!("{}ms", start.elapsed().as_millis()), "connection complete"
            ),
            Err(e) => tracing::info!(
                target: "access", direction = "inbound",
                src.addr = %peer, src.identity = %peer_id, dst.hbone_addr = %authority,
                error = %e, "connection ended with an error"
            ),
        }
    }

    /// The checks of ztunnel's inbound path, in its order; the upstream connection on success.
    async fn check_connect(
        &self,
        incoming: &server::Incoming,
        peer: SocketAddr,
        local: SocketAddr,
        peer_id: &Identity,
    ) -> Result<TcpStream, Refusal> {
        let req = &incoming.request;
        if req.method() != Method::CONNECT {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("method {} is not CONNECT", req.method()),
            ));
        }
        let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let workload = self
            .local_workload()
            .await
            .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let target: SocketAddr = match authority.parse::<SocketAddr>() {
            Ok(addr) => {
                let addr = socket::canonical(addr);
                if addr.ip() != local.ip() {
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        format!("ip mismatch: {} != {}", addr.ip(), local.ip()),
                    ));
                }
                addr
            }
            Err(_) => {
                // `hostname:port`: a service this workload backs, its port mapped to the workload's port.
                let (host, port) = authority
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                    .ok_or_else(|| {
                        refuse(
                            StatusCode::BAD_REQUEST,
                            format!("authority {authority:?} is not ip:port or host:port"),
                        )
                    })?;
                let state = self.inputs.state.load();
                let svc = state
                    .service_by_host(host, &workload.namespace)
                    .ok_or_else(|| {
                        refuse(StatusCode::BAD_REQUEST, format!("unknown service {host}"))
                    })?;
                let target_port = workload
                    .services
                    .get(&svc.key())
                    .and_then(|m| m.get(&port))
                    .or_else(|| svc.ports.get(&port))
                    .copied()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        refuse(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("service {host} has no port {port} on this workload"),
                        )
                    })?;
                SocketAddr::new(local.ip(), target_port)
            }
        };
        if self.cfg().ports.illegal().contains(&target.port()) {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                Error::SelfCall(target).to_string(),
            ));
        }
        let state = self.inputs.state.load();
        let conn = Connection {
            src: peer,
            dst: target,
            src_identity: Some(peer_id),
            dst_network: &self.cfg().network,
        };
        if let Decision::Deny(reason) =
            state
                .policies()
                .check(&workload.namespace, &workload.authorization_policies, &conn)
        {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                Error::Denied(reason).to_string(),
            ));
        }
        let src_ip: Option<IpAddr> = self.inputs.orig_src.then_some(peer.ip());
        socket::connect(
            self.inputs.netns.as_deref(),
            target,
            src_ip,
            self.upstream_opts(),
            self.cfg().connect_timeout,
        )
        .await
        .map_err(|e| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                Error::Connect {
                    dst: target,
                    source: e,
                }
                .to_string(),
            )
        })
    }

    /// Socket options towards the application: the mark, and transparency when keeping the source address.
    pub(super) fn upstream_opts(&self) -> socket::SocketOpts {
        socket::SocketOpts {
            transparent: self.inputs.orig_src,
            ..self.inputs.sock
        }
    }
}
