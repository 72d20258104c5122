//! ZDS: handing pod network namespaces from the CNI agent to the node proxy, byte-compatible with istio-cni
//! (agent, the server) and ztunnel (proxy, the client).
//!
//! Transport ([`packet`]): AF_UNIX SOCK_SEQPACKET, one protobuf (`istio.workload.zds`) per packet, no length
//! prefix; the pod's netns travels as exactly one SCM_RIGHTS fd on `AddWorkload` only; packets are read into
//! a [`MAX_MESSAGE`]-byte buffer and a truncated packet is an error; every read and write the agent makes
//! has an [`IO_TIMEOUT`] deadline.
//! Conversation: proxy sends `ZdsHello{V1}` → agent sends its snapshot (`AddWorkload` with fd / `KeepWorkload`)
//! → `SnapshotSent` → then `AddWorkload`/`DelWorkload` updates. Every request gets exactly one
//! `WorkloadResponse{ack}` before the next is sent; a non-empty `Ack.error` is a NACK.
//!
//! - [`server`] — the agent side: accept loop, per-connection snapshot, add to the newest proxy, del to all.
//! - [`client`] — the proxy side: hello, validated requests (fd checks), acks.
//!
//! Both sides share [`Error`].

use std::io;
use std::time::Duration;

pub mod client;
pub mod packet;
pub mod server;

#[cfg(test)]
mod tests;

pub use client::{Request, ZdsClient};
pub use packet::{bind, SeqpacketConn, SeqpacketListener};
pub use server::{SnapshotEntry, SnapshotSource, ZdsServer};

/// Largest ZDS message, in bytes: istio-cni and ztunnel both read into a buffer of this size, so anything
/// longer would be truncated by the receiver. Senders refuse to send more.
pub const MAX_MESSAGE: usize = 1024;

/// Deadline for each read and write on a ZDS socket (istio-cni's `readWriteDeadline`).
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong on a ZDS connection.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No proxy is connected, so an `AddWorkload` has nowhere to go.
    #[error("no node proxy is connected to the ZDS socket")]
    NoProxy,
    /// The proxy answered with a NACK.
    #[error("node proxy rejected workload {uid}: {error}")]
    Nack {
        /// Pod UID of the request ("" for SnapshotSent).
        uid: String,
        /// The proxy's reason.
        error: String,
    },
    /// A read or write did not finish within [`IO_TIMEOUT`] (or a request waited too long in the queue).
    #[error("timed out {during}")]
    Timeout {
        /// The step that timed out.
        during: &'static str,
    },
    /// A socket call failed.
    #[error("{during}: {source}")]
    Io {
        /// The step that failed.
        during: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The peer sent something the protocol does not allow.
    #[error("ZDS protocol error: {0}")]
    Protocol(String),
    /// The peer closed the connection (or the connection was dropped before the request was answered).
    #[error("ZDS connection closed {during}")]
    Closed {
        /// The step during which the close was noticed.
        during: &'static str,
    },
    /// A message would not fit in the receiver's [`MAX_MESSAGE`]-byte buffer; nothing was sent.
    #[error("ZDS message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The limit ([`MAX_MESSAGE`]).
        max: usize,
    },
}

impl Error {
    fn io(during: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { during, source }
    }
}

/// Runs `fut` with the [`IO_TIMEOUT`] deadline, mapping its io error and a timeout to [`Error`].
async fn with_deadline<T>(
    during: &'static str,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(IO_TIMEOUT, fut).await {
        Ok(result) => result.map_err(Error::io(during)),
        Err(_elapsed) => Err(Error::Timeout { during }),
    }
}

/// Encodes `msg`, refusing anything the receiver could not read whole.
fn encode(msg: &impl prost::Message) -> Result<Vec<u8>, Error> {
    let len = msg.encoded_len();
    if len > MAX_MESSAGE {
        return Err(Error::TooLarge {
            len,
            max: MAX_MESSAGE,
        });
    }
    Ok(msg.encode_to_vec())
}
