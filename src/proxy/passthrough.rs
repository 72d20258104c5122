//! Plaintext inbound (:15006): connections that reach the workload without HBONE (from outside the mesh).
//!
//! Input: an accepted TCP connection redirected by the capture rules. Output: the connection joined to its
//! original destination, if authorization allows a connection with no identity — so a STRICT peer
//! authentication (a DENY of identity-less sources) refuses it. Refusals reset the connection. Carried
//! connections stay registered with the proxy's [`connections`](super::connections) registry and are reset
//! if a later policy change denies them. Each connection is counted in [`metrics`](crate::metrics)
//! (reporter `destination`, `connection_security_policy` `unknown`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::connections::{deciding_policy, Counted, Tracked};
use super::{Error, Proxy};
use crate::authz::{Connection, Decision};
use crate::metrics::{Reporter, ResponseFlags, TrafficLabels};
use crate::socket;

/// How a carried connection ended.
enum Ended {
    /// The copy finished, cleanly or not.
    Copied(std::io::Result<(u64, u64)>),
    /// A policy change denied it.
    Closed(crate::authz::DenyReason),
}

impl Proxy {
    /// Handles one connection accepted on :15006.
    pub(super) async fn inbound_plaintext(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        match socket::original_dst(&stream) {
            Ok(dst) => self.inbound_plaintext_to(stream, peer, dst).await,
            Err(e) => {
                socket::reset_on_close(&stream);
                tracing::info!(target: "access", direction = "inbound", src.addr = %peer, error = %Error::OriginalDst(e), "connection refused");
            }
        }
    }

    /// Carries plaintext `stream` from `peer` to `dst` (its original destination) if authorization allows.
    /// Public so that embedders and tests can hand over connections they captured some other way.
    pub async fn inbound_plaintext_to(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        let start = Instant::now();
        let refused = |stream: &TcpStream, e: &Error, policy: &str| {
            // A reset, not a clean close: the client learns at once that it was refused.
            socket::reset_on_close(stream);
            tracing::info!(target: "access", direction = "inbound", src.addr = %peer, dst.addr = %dst, policy, error = %e, "connection refused");
        };
        if self.cfg().ports.illegal().contains(&dst.port()) {
            return refused(&stream, &Error::SelfCall(dst), "-");
        }
        let workload = match self.local_workload().await {
            Ok(w) => w,
            Err(e) => return refused(&stream, &e, "-"),
        };
        let network = &self.cfg().network;
        let state = self.inputs.state.load();
        let labels = TrafficLabels::new(
            Reporter::destination,
            state.workload_by_addr(network, peer.ip()).map(|w| &**w),
            None,
            Some(&workload),
            super::service_for(&state, &workload, dst.port()).as_deref(),
        );
        let mut record = self.metrics().open(labels);
        // Registered before the check, so a policy change between the two is never missed.
        let mut registration = match self.conns.register(Tracked {
            src: peer,
            dst,
            src_identity: None,
            workload: workload.clone(),
        }) {
            Ok(r) => r,
            Err(full) => {
                record.close(ResponseFlags::Connect, 0, 0);
                return refused(&stream, &Error::Io(std::io::Error::other(full)), "-");
            }
        };
        let state = self.inputs.state.load();
        let conn = Connection {
            src: peer,
            dst,
            src_identity: None,
            dst_network: network,
        };
        if let Decision::Deny(reason) =
            state
                .policies()
                .check(&workload.namespace, &workload.authorization_policies, &conn)
        {
            record.close(ResponseFlags::Deny, 0, 0);
            let policy = deciding_policy(&reason).to_string();
            return refused(&stream, &Error::Denied(reason), &policy);
        }
        let src_ip: Option<IpAddr> = self.inputs.orig_src.then_some(peer.ip());
        let up = match socket::connect(
            self.inputs.netns.as_deref(),
            dst,
            src_ip,
            self.upstream_opts(),
            &self.cfg().keepalive,
            self.cfg().connect_timeout,
        )
        .await
        {
            Ok(up) => up,
            Err(source) => {
                record.close(ResponseFlags::Connect, 0, 0);
                return refused(&stream, &Error::Connect { dst, source }, "-");
            }
        };
        // Upstream: written = received from the initiator, read = sent towards it.
        let live = record.live_bytes();
        let mut up = Counted::new(up).live(
            live.as_ref().map(|l| l.sent.clone()),
            live.map(|l| l.received),
        );
        let ended = tokio::select! {
            res = tokio::io::copy_bidirectional(&mut stream, &mut up) => Ended::Copied(res),
            reason = registration.closed() => Ended::Closed(reason),
        };
        let (received, sent) = (up.written, up.read);
        let duration = format!("{}ms", start.elapsed().as_millis());
        match ended {
            Ended::Copied(Ok(_)) => {
                record.close(ResponseFlags::None, received, sent);
                tracing::info!(
                    target: "access", direction = "inbound", src.addr = %peer, dst.addr = %dst,
                    bytes_sent = sent, bytes_recv = received, duration, "connection complete"
                )
            }
            Ended::Copied(Err(e)) => {
                record.close(ResponseFlags::None, received, sent);
                tracing::info!(
                    target: "access", direction = "inbound", src.addr = %peer, dst.addr = %dst,
                    bytes_sent = sent, bytes_recv = received, duration, error = %e,
                    "connection ended with an error"
                )
            }
            Ended::Closed(reason) => {
                record.close(ResponseFlags::Deny, received, sent);
                socket::reset_on_close(&stream);
                tracing::info!(
                    target: "access", direction = "inbound", src.addr = %peer, dst.addr = %dst,
                    bytes_sent = sent, bytes_recv = received, duration,
                    policy = deciding_policy(&reason), reason = %reason,
                    "connection closed due to policy change"
                )
            }
        }
    }
}
