//! Plaintext inbound (:15006): connections that reach the workload without HBONE (from outside the mesh).
//!
//! Input: an accepted TCP connection redirected by the capture rules. Output: the connection joined to its
//! original destination, if authorization allows a connection with no identity — so a STRICT peer
//! authentication (a DENY of identity-less sources) refuses it. Refusals close the connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;

use super::{Error, Proxy};
use crate::authz::{Connection, Decision};
use crate::socket;

impl Proxy {
    /// Handles one connection accepted on :15006.
    pub(super) async fn inbound_plaintext(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) {
        let result = async {
            let dst = socket::original_dst(&stream).map_err(Error::OriginalDst)?;
            if self.cfg().ports.illegal().contains(&dst.port()) {
                return Err(Error::SelfCall(dst));
            }
            let workload = self.local_workload().await?;
            let state = self.inputs.state.load();
            let conn = Connection {
                src: peer,
                dst,
                src_identity: None,
                dst_network: &self.cfg().network,
            };
            if let Decision::Deny(reason) =
                state
                    .policies()
                    .check(&workload.namespace, &workload.authorization_policies, &conn)
            {
                return Err(Error::Denied(reason));
            }
            let src_ip: Option<IpAddr> = self.inputs.orig_src.then_some(peer.ip());
            let mut up = socket::connect(
                self.inputs.netns.as_deref(),
                dst,
                src_ip,
                self.upstream_opts(),
                self.cfg().connect_timeout,
            )
            .await
            .map_err(|source| Error::Connect { dst, source })?;
            let (sent, recv) = tokio::io::copy_bidirectional(&mut stream, &mut up).await?;
            Ok((dst, sent, recv))
        }
        .await;
        match result {
            Ok((dst, sent, recv)) => tracing::info!(
                target: "access", direction = "inbound", src.addr = %peer, dst.addr = %dst,
                bytes_sent = recv, bytes_recv = sent, "connection complete"
            ),
            Err(e) => {
                if matches!(e, Error::Denied(_)) {
                    // A reset, not a clean close: the client learns at once that it was refused.
                    socket::reset_on_close(&stream);
                }
                tracing::info!(target: "access", direction = "inbound", src.addr = %peer, error = %e, "connection refused")
            }
        }
    }
}
