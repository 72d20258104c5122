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

use super::access::{self, Access};
use super::connections::{Counted, Side, Tracked};
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
                access::failed(Reporter::destination, peer, None, &Error::OriginalDst(e));
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
        // A reset, not a clean close: the client learns at once that it was refused.
        let early = |stream: &TcpStream, e: &Error| {
            socket::reset_on_close(stream);
            access::failed(Reporter::destination, peer, Some(dst), e);
        };
        if self.cfg().ports.illegal().contains(&dst.port()) {
            return early(&stream, &Error::SelfCall(dst));
        }
        let workload = match self.local_workload().await {
            Ok(w) => w,
            Err(e) => return early(&stream, &e),
        };
        let network = &self.cfg().network;
        let state = self.inputs.state.load();
        let src_workload = state.workload_by_addr(network, peer.ip()).cloned();
        let labels = TrafficLabels::new(
            Reporter::destination,
            src_workload.as_deref(),
            None,
            Some(&workload),
            super::service_for(&state, &workload, dst.port()).as_deref(),
        );
        let mut record = self.metrics().open(labels);
        let access = Access {
            reporter: Reporter::destination,
            src: peer,
            src_workload: src_workload.as_deref(),
            dst,
            hbone_addr: None,
            dst_workload: Some(&workload),
            start,
            resumable: None,
        };
        let refused = |stream: &TcpStream, record, flags, e: &Error| {
            socket::reset_on_close(stream);
            access.close(record, flags, 0, 0, Some(e));
        };
        // Registered before the check, so a policy change between the two is never missed.
        let mut registration = match self.conns.register(Tracked {
            src: peer,
            dst,
            src_identity: None,
            workload: workload.clone(),
        }) {
            Ok(r) => r,
            Err(full) => {
                let e = Error::Io(std::io::Error::other(full));
                return refused(&stream, record, ResponseFlags::Connect, &e);
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
            return refused(&stream, record, ResponseFlags::Deny, &Error::Denied(reason));
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
                let e = Error::Connect { dst, source };
                return refused(&stream, record, ResponseFlags::Connect, &e);
            }
        };
        let live = record.live_bytes();
        let mut up = Counted::facing(up, Side::Server, live.as_ref());
        let ended = tokio::select! {
            res = tokio::io::copy_bidirectional(&mut stream, &mut up) => Ended::Copied(res),
            reason = registration.closed() => Ended::Closed(reason),
        };
        let (received, sent) = (up.written, up.read);
        match ended {
            Ended::Copied(res) => access.copied(record, received, sent, res),
            Ended::Closed(reason) => {
                socket::reset_on_close(&stream);
                let error = format_args!("connection closed due to policy change: {reason}");
                access.close(record, ResponseFlags::Deny, received, sent, Some(&error));
            }
        }
    }
}
