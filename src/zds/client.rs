//! ZDS client: the node proxy's side of the conversation (ztunnel's `inpod` protocol).
//!
//! Input: the agent's socket path. Output: validated [`Request`]s — an `Add` always carries a checked network
//! namespace — and the acks the caller sends back. It enforces what ztunnel enforces: `AddWorkload` carries
//! `workload_info` and exactly one fd that is a netns; no other message carries fds; `KeepWorkload` only
//! before `SnapshotSent`, which comes once. Violations are [`Error::Protocol`]; fds that arrived with a bad
//! message are closed. The caller acks every received message, NACKing the ones it rejected.
//! Waiting for the next request has no deadline (the agent may be idle for hours); sending an ack does.

use std::path::Path;

use prost::Message;

use super::packet::SeqpacketConn;
use super::{encode, with_deadline, Error, MAX_MESSAGE};
use crate::netns::Netns;
use crate::proto::workload::zds::{
    workload_request, workload_response, Ack, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello,
};

/// One validated request from the agent.
#[derive(Debug)]
pub enum Request {
    /// Start proxying for a pod whose network namespace is `netns`.
    Add {
        /// Pod UID.
        uid: String,
        /// Pod name, namespace and service account.
        info: WorkloadInfo,
        /// The pod's network namespace (received over SCM_RIGHTS, checked to be nsfs).
        netns: Netns,
    },
    /// Part of the snapshot: keep this pod's proxy, no netns is sent.
    Keep {
        /// Pod UID.
        uid: String,
    },
    /// Stop proxying for a pod.
    Del {
        /// Pod UID.
        uid: String,
    },
    /// The snapshot is complete: pods not named since connecting are to be removed.
    SnapshotSent,
}

/// A connection to the agent's ZDS socket.
#[derive(Debug)]
pub struct ZdsClient {
    conn: SeqpacketConn,
    buf: Box<[u8; MAX_MESSAGE]>,
    snapshot_sent: bool,
    /// A message was received and not yet acked; acks are only sent in answer to one.
    ack_owed: bool,
}

impl ZdsClient {
    /// Connects to the agent at `path` and sends `ZdsHello{version: V1}`.
    pub async fn connect(path: &Path) -> Result<ZdsClient, Error> {
        let conn =
            with_deadline("connecting to the ZDS socket", SeqpacketConn::connect(path)).await?;
        ZdsClient::handshake(conn).await
    }

    /// Sends the hello on an already connected socket.
    pub async fn handshake(conn: SeqpacketConn) -> Result<ZdsClient, Error> {
        let hello = encode(&ZdsHello {
            version: Version::V1 as i32,
        })?;
        with_deadline("sending ZdsHello", conn.send(&hello, None)).await?;
        Ok(ZdsClient {
            conn,
            buf: Box::new([0; MAX_MESSAGE]),
            snapshot_sent: false,
            ack_owed: false,
        })
    }

    /// Waits for the next request. Any error but [`Error::Closed`] and a failed read still owes the agent a
    /// (NACK) ack; [`Error::Protocol`] is how a misbehaving agent shows up.
    pub async fn recv(&mut self) -> Result<Request, Error> {
        let (len, mut fds) = self.conn.recv(&mut self.buf[..]).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::InvalidData {
                // Truncated packet: it did arrive, so the agent waits for an answer.
                self.ack_owed = true;
            }
            Error::Io {
                during: "receiving a ZDS request",
                source,
            }
        })?;
        if len == 0 && fds.is_empty() {
            return Err(Error::Closed {
                during: "waiting for a ZDS request",
            });
        }
        self.ack_owed = true;
        let request = WorkloadRequest::decode(&self.buf[..len])
            .map_err(|e| Error::Protocol(format!("undecodable WorkloadRequest: {e}")))?;
        if fds.len() > 1 {
            return Err(Error::Protocol(format!(
                "expected at most one fd, got {}",
                fds.len()
            )));
        }
        let fd = fds.pop();
        use workload_request::Payload;
        match request.payload {
            Some(Payload::Add(add)) => {
                let fd = fd.ok_or_else(|| {
                    Error::Protocol(format!("AddWorkload {} without a netns fd", add.uid))
                })?;
                let info = add.workload_info.ok_or_else(|| {
                    Error::Protocol(format!("AddWorkload {} without workload_info", add.uid))
                })?;
                let netns = Netns::from_fd(fd).map_err(|e| {
                    Error::Protocol(format!("AddWorkload {}: fd is not a netns: {e}", add.uid))
                })?;
                Ok(Request::Add {
                    uid: add.uid,
                    info,
                    netns,
                })
            }
            other if fd.is_some() => Err(Error::Protocol(format!(
                "unexpected fd with {}",
                payload_name(other.as_ref())
            ))),
            Some(Payload::Keep(keep)) if self.snapshot_sent => Err(Error::Protocol(format!(
                "KeepWorkload {} after SnapshotSent",
                keep.uid
            ))),
            Some(Payload::Keep(keep)) => Ok(Request::Keep { uid: keep.uid }),
            Some(Payload::Del(del)) => Ok(Request::Del { uid: del.uid }),
            Some(Payload::SnapshotSent(_)) if self.snapshot_sent => {
                Err(Error::Protocol("second SnapshotSent".into()))
            }
            Some(Payload::SnapshotSent(_)) => {
                self.snapshot_sent = true;
                Ok(Request::SnapshotSent)
            }
            None => Err(Error::Protocol("WorkloadRequest without payload".into())),
        }
    }

    /// Answers the last received message: `None` is an ACK, `Some(reason)` a NACK. Refused (as
    /// [`Error::Protocol`]) when nothing is waiting for an answer: the agent treats unasked data as an error.
    pub async fn ack(&mut self, error: Option<&str>) -> Result<(), Error> {
        if !self.ack_owed {
            return Err(Error::Protocol("ack without a request to answer".into()));
        }
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: truncate(error.unwrap_or_default(), MAX_NACK_REASON).to_owned(),
            })),
        };
        let bytes = encode(&response)?;
        with_deadline("sending an ack", self.conn.send(&bytes, None)).await?;
        self.ack_owed = false;
        Ok(())
    }

    /// Whether `SnapshotSent` has arrived on this connection.
    pub fn snapshot_done(&self) -> bool {
        self.snapshot_sent
    }
}

/// Longest NACK reason sent: keeps the ack well inside the agent's [`MAX_MESSAGE`]-byte read buffer.
const MAX_NACK_REASON: usize = MAX_MESSAGE - 32;

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn payload_name(payload: Option<&workload_request::Payload>) -> &'static str {
    use workload_request::Payload;
    match payload {
        Some(Payload::Add(_)) => "AddWorkload",
        Some(Payload::Del(_)) => "DelWorkload",
        Some(Payload::SnapshotSent(_)) => "SnapshotSent",
        Some(Payload::Keep(_)) => "KeepWorkload",
        None => "an empty WorkloadRequest",
    }
}
