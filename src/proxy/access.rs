//! Access lines (target `access`) for the node proxy's connections, in ztunnel's shape.
//!
//! Input: a connection's addresses, the workloads at its two ends as routing or the state resolved them,
//! and its metric labels ([`TrafficLabels`], built once when it was counted as opened). Output: one line
//! at its end ([`Access::close`], which also closes its [`ConnectionRecord`]):
//! - `connection complete` at `info` when it ended well; at `error`, with `error`, when it did not
//!   (refused by authorization, upstream or tunnel unreachable, copy failed, closed by a policy change),
//!   as ztunnel logs every counted connection;
//! - `connection failed` at `warn` with `src.addr`, `dst.addr`, `direction`, `error` for a connection
//!   refused before it was counted ([`failed`]: ztunnel's early deny — self-call, unknown local workload,
//!   no healthy endpoint, unusable waypoint, TLS handshake failure).
//!
//! Fields, in ztunnel's order: `src.addr`, `src.workload` (the pod's name, else its canonical service),
//! `src.namespace`, `src.identity` (mTLS only), `src.cluster`, `dst.addr` (where this proxy sent it: the
//! peer's `:15008` for HBONE; inbound, the `:15008` address it arrived on), `dst.hbone_addr` (the CONNECT
//! authority; HBONE only), `dst.service`, `dst.workload`, `dst.namespace`, `dst.identity` (mTLS only),
//! `dst.cluster`, `direction`, `bytes_sent`, `bytes_recv`, `duration`. Bytes are seen from this proxy's
//! side, as ztunnel un-flips Istio's metric directions for its logs: outbound sends what the client wrote,
//! inbound sends what the server answered. Values the labels hold as `unknown` are left out.
//!
//! Cost: nothing while the connection copies; at its end, the fields are borrowed from the labels and
//! workloads already held, plus the `duration` string — and only if the `access` target is enabled.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Instant;

use tracing::Level;

use crate::metrics::{ConnectionRecord, Reporter, ResponseFlags, SecurityPolicy, TrafficLabels};
use crate::state::Workload;

/// What an access line says about one connection, besides its labels.
pub(super) struct Access<'a> {
    /// Whose proxy: `source` logs `direction="outbound"`, `destination` `"inbound"`.
    pub(super) reporter: Reporter,
    /// The downstream peer's address.
    pub(super) src: SocketAddr,
    /// The source workload, if known (its pod name).
    pub(super) src_workload: Option<&'a Workload>,
    /// Where the connection went (outbound) or arrived (inbound).
    pub(super) dst: SocketAddr,
    /// The HBONE CONNECT authority, for tunnelled connections.
    pub(super) hbone_addr: Option<&'a (dyn Display + Sync)>,
    /// The destination workload, if known (its pod name).
    pub(super) dst_workload: Option<&'a Workload>,
    /// When the connection was accepted.
    pub(super) start: Instant,
    /// With resumable streams on, whether this HBONE connection's stream is resumable (`false`: the peer,
    /// e.g. ztunnel, did not take part, and a broken tunnel ends the connection as before). `None`: off,
    /// or not HBONE; the field is then left out.
    pub(super) resumable: Option<bool>,
}

fn direction(reporter: Reporter) -> &'static str {
    match reporter {
        Reporter::source => "outbound",
        Reporter::destination => "inbound",
    }
}

/// A label value as the access line shows it: `unknown` (the labels' word for "not known") is left out.
fn known(value: &str) -> Option<&str> {
    (!value.is_empty() && value != "unknown").then_some(value)
}

/// ztunnel's name for a workload in access lines: the pod's name, else its canonical service.
fn name<'a>(w: Option<&'a Workload>, canonical: Option<&'a str>) -> Option<&'a str> {
    w.map(|w| w.name.as_str())
        .filter(|n| !n.is_empty())
        .or_else(|| canonical.and_then(known))
}

/// One line, at `$level`, with ztunnel's fields and then `$($more)*` (the error, when there is one).
macro_rules! access_line {
    ($level:expr, $a:expr, $l:expr, $sent:expr, $recv:expr, $duration:expr; $($more:tt)*) => {
        tracing::event!(
            target: "access",
            $level,
            src.addr = %$a.src,
            src.workload = name($a.src_workload, $l.map(|l| l.peer.source_canonical_service.as_str())),
            src.namespace = $l.and_then(|l| known(&l.peer.source_workload_namespace)),
            src.identity = $l.filter(|l| mtls(l)).and_then(|l| known(&l.peer.source_principal)),
            src.cluster = $l.and_then(|l| known(&l.peer.source_cluster)),
            dst.addr = %$a.dst,
            dst.hbone_addr = $a.hbone_addr.map(display),
            dst.service = $l.and_then(|l| known(&l.peer.destination_service)),
            dst.workload = name($a.dst_workload, $l.map(|l| l.peer.destination_canonical_service.as_str())),
            dst.namespace = $l.and_then(|l| known(&l.peer.destination_workload_namespace)),
            dst.identity = $l.filter(|l| mtls(l)).and_then(|l| known(&l.peer.destination_principal)),
            dst.cluster = $l.and_then(|l| known(&l.peer.destination_cluster)),
            direction = direction($a.reporter),
            bytes_sent = $sent,
            bytes_recv = $recv,
            duration = $duration,
            resumable = $a.resumable,
            $($more)*
            "connection complete"
        )
    };
}

fn mtls(l: &TrafficLabels) -> bool {
    l.connection_security_policy == SecurityPolicy::mutual_tls
}

impl Access<'_> {
    /// Logs the connection's end and closes its metrics record: `received` bytes from the initiator,
    /// `sent` towards it, `flags` and `error` saying why it failed, if it did.
    pub(super) fn close(
        &self,
        record: ConnectionRecord,
        flags: ResponseFlags,
        received: u64,
        sent: u64,
        error: Option<&dyn Display>,
    ) {
        self.log(record.labels(), received, sent, error);
        record.close(flags, received, sent);
    }

    /// [`close`](Self::close) for a connection whose copy ended with `copied`: no flag, the copy's
    /// error if it had one.
    pub(super) fn copied<T, E: Display>(
        &self,
        record: ConnectionRecord,
        received: u64,
        sent: u64,
        copied: Result<T, E>,
    ) {
        let error = copied.err();
        let error = error.as_ref().map(|e| e as &dyn Display);
        self.close(record, ResponseFlags::None, received, sent, error);
    }

    fn log(
        &self,
        labels: Option<&TrafficLabels>,
        received: u64,
        sent: u64,
        error: Option<&dyn Display>,
    ) {
        let (bytes_sent, bytes_recv) = match self.reporter {
            Reporter::source => (received, sent),
            Reporter::destination => (sent, received),
        };
        let duration = || format!("{}ms", self.start.elapsed().as_millis());
        match error {
            None => access_line!(Level::INFO, self, labels, bytes_sent, bytes_recv, duration();),
            Some(e) => access_line!(
                Level::ERROR, self, labels, bytes_sent, bytes_recv, duration(); error = %e,
            ),
        }
    }
}

/// ztunnel's early deny: a connection refused before it was counted (no labels yet).
pub(super) fn failed(
    reporter: Reporter,
    src: SocketAddr,
    dst: Option<SocketAddr>,
    error: &dyn Display,
) {
    tracing::event!(
        target: "access",
        Level::WARN,
        src.addr = %src,
        dst.addr = dst.map(display),
        direction = direction(reporter),
        error = %error,
        "connection failed"
    );
}
