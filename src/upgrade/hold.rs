//! Holding a leaving proxy's connections while no new one is there: a restart without overlap.
//!
//! **Job.** A rolling update starts the new node proxy beside the old one, and the old one hands its
//! connections straight to it ([`super::handover`]). A plain restart has no such overlap: the container is
//! restarted (a crash loop's back-off, a liveness failure, `kill` of the pod's process, `systemctl
//! restart`), so the old process is gone before the new one is ready. The CNI agent, which lives in
//! another pod and outlives the proxy's restarts, holds the connections meanwhile: the leaving proxy,
//! finding nobody on the hand-over socket, hands them to the agent's hold socket instead
//! ([`path_beside`]); the agent keeps the sockets (the kernel keeps their TCP connections: the apps'
//! bytes wait in the socket buffers, flow control holds the rest) and hands them on, unchanged, as soon as
//! a new proxy listens on the hand-over socket. That new proxy adopts them as it would from an old one.
//!
//! **Inputs.** The hold socket's path (listened on), the hand-over socket's path (handed on to), how long
//! to hold ([`serve`]'s `keep`: the peers of the held streams wait as long for them to come back,
//! `MESHNODE_RESUME_WAIT`, so holding longer gains nothing), and the shutdown signal.
//!
//! **Outputs.** Log lines per hold: how many connections were taken, handed on, or closed because no
//! proxy came back in time. Held connections are opaque here (records and fds, `Handed`); nothing is
//! decoded or served.
//!
//! **Bounds.** At most [`MAX_HOLDS`] hand-overs are held at once (a node has one proxy; more than one
//! leaving at a time is a fault), each for at most `keep`; a held hand-over is tried every
//! [`RETRY`] until then. A hand-over arriving while [`MAX_HOLDS`] are held is refused (its sender keeps its
//! connections, which then drain). The agent stopping or restarting closes what it holds: the sockets
//! live in its process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::handover::{Error, Fds, Handed, Receiver, Sender};

/// The hold socket's file name, in the hand-over socket's directory.
pub const HOLD_SOCKET: &str = "meshnode-hold.sock";

/// Most hand-overs held at once.
pub const MAX_HOLDS: usize = 4;

/// How often a held hand-over tries the hand-over socket.
pub const RETRY: Duration = Duration::from_millis(100);

/// The hold socket beside the hand-over socket `handover` (both in the node's `/var/run/ztunnel`, which
/// the proxy's and the agent's pods mount).
pub fn path_beside(handover: &Path) -> PathBuf {
    handover.with_file_name(HOLD_SOCKET)
}

/// Holds what leaving proxies hand over at `hold` and hands it on to the proxy that listens at `handover`
/// next, within `keep` of its arrival; until `shutdown`. Errors only when the hold socket cannot be
/// listened on.
pub async fn serve(
    hold: PathBuf,
    handover: PathBuf,
    keep: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let receiver = Receiver::bind(&hold)?;
    tracing::info!(hold = %hold.display(), handover = %handover.display(), ?keep, "holding connections of a proxy that restarts");
    let held = Arc::new(AtomicUsize::new(0));
    loop {
        // A hand-over beyond the bound is not accepted: its sender finds nobody answering and keeps its
        // connections (they drain there).
        while held.load(Ordering::Acquire) >= MAX_HOLDS {
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
        }
        let received = tokio::select! {
            r = receiver.accept_all() => r,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        if let Some(e) = &received.error {
            tracing::warn!(taken = received.conns.len(), error = %e, "hand-over to hold ended early");
        }
        if received.conns.is_empty() {
            continue;
        }
        tracing::info!(
            connections = received.conns.len(),
            "holding a leaving proxy's connections until a new one is ready"
        );
        held.fetch_add(1, Ordering::AcqRel);
        let (held, handover, shutdown) = (held.clone(), handover.clone(), shutdown.clone());
        tokio::spawn(async move {
            hand_on(received.conns, &handover, keep, shutdown).await;
            held.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Hands `conns` to the first proxy listening at `handover` within `keep`, or closes them.
async fn hand_on(
    conns: Vec<(Handed, Fds)>,
    handover: &Path,
    keep: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let count = conns.len();
    let deadline = tokio::time::Instant::now() + keep;
    let started = tokio::time::Instant::now();
    let sender = loop {
        match Sender::connect(handover).await {
            Ok(s) => break s,
            Err(_) if tokio::time::Instant::now() + RETRY < deadline => {}
            Err(e) => {
                tracing::warn!(connections = count, ?keep, error = %e, "held connections closed: no proxy came back in time");
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.wait_for(|s| *s) => {
                tracing::warn!(connections = count, "held connections closed: the agent is stopping");
                return;
            }
        }
    };
    let report = sender.send(conns).await;
    let kept = report.kept.len();
    match report.error {
        None if kept == 0 => tracing::info!(
            connections = count,
            held_ms = started.elapsed().as_millis() as u64,
            "held connections handed on to the new proxy"
        ),
        error => tracing::warn!(
            taken = report.taken.len(),
            closed = kept,
            error = error.map(|e| e.to_string()),
            "held connections handed on in part; the rest are closed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::handover::Direction;

    use std::os::fd::OwnedFd;

    fn conn(id: u64) -> (Handed, Fds) {
        let handed = Handed {
            id,
            pod: "uid-1".into(),
            direction: Direction::Outbound,
            original_dst: "10.0.0.2:8080".parse().unwrap(),
            peer: "10.0.0.2:15008".parse().unwrap(),
            peer_identity: "spiffe://cluster.local/ns/default/sa/server".into(),
            to_app: b"not yet delivered".to_vec(),
            to_peer: vec![7; 20_000],
            resume: vec![1, 2, 3],
        };
        let app = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        (handed, Fds { app, peer: None })
    }

    /// A holder keeping hand-overs for `keep`, listening: its directory, hold and hand-over socket paths,
    /// its stop switch and its task.
    async fn holder(
        keep: Duration,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        PathBuf,
        watch::Sender<bool>,
        tokio::task::JoinHandle<Result<(), Error>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (hold, handover) = (
            dir.path().join("hold.sock"),
            dir.path().join("handover.sock"),
        );
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(serve(hold.clone(), handover.clone(), keep, shutdown));
        while !hold.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (dir, hold, handover, stop, task)
    }

    #[test]
    fn the_hold_socket_is_beside_the_handover_socket() {
        assert_eq!(
            path_beside(Path::new("/var/run/ztunnel/meshnode-handover.sock")),
            Path::new("/var/run/ztunnel/meshnode-hold.sock")
        );
    }

    #[tokio::test]
    async fn held_connections_reach_the_proxy_that_comes_back_unchanged() {
        let (_dir, hold, handover, stop, holder) = holder(Duration::from_secs(10)).await;
        // The old proxy leaves: nobody on the hand-over socket, so it hands its connections to the hold.
        assert!(Sender::connect(&handover).await.is_err());
        let sent: Vec<Handed> = (0..3).map(|i| conn(i).0).collect();
        let report = Sender::connect(&hold)
            .await
            .unwrap()
            .send((0..3).map(conn).collect())
            .await;
        assert!(report.error.is_none(), "{:?}", report.error);
        assert_eq!(report.taken, vec![0, 1, 2]);
        // The new proxy comes up a while later and gets them, as from an old proxy.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let receiver = Receiver::bind(&handover).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), receiver.accept_all())
            .await
            .expect("the held connections handed on");
        assert!(got.error.is_none(), "{:?}", got.error);
        let got: Vec<Handed> = got.conns.into_iter().map(|(h, _)| h).collect();
        assert_eq!(got, sent);
        stop.send_replace(true);
        holder.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn held_connections_are_closed_when_no_proxy_comes_back_in_time() {
        let (_dir, hold, handover, stop, holder) = holder(Duration::from_millis(300)).await;
        // A real socket pair: the held end closing is seen on the other end as EOF.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut app = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (held, _) = listener.accept().unwrap();
        let (handed, _) = conn(9);
        let report = Sender::connect(&hold)
            .await
            .unwrap()
            .send(vec![(
                handed,
                Fds {
                    app: OwnedFd::from(held),
                    peer: None,
                },
            )])
            .await;
        assert_eq!(report.taken, vec![9]);
        app.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let closed = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            app.read(&mut [0; 8])
        })
        .await
        .unwrap();
        assert_eq!(
            closed.unwrap(),
            0,
            "the held connection is closed at the deadline"
        );
        // Nothing comes later to a proxy that starts after the deadline.
        let receiver = Receiver::bind(&handover).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), receiver.accept_all())
                .await
                .is_err()
        );
        stop.send_replace(true);
        holder.await.unwrap().unwrap();
    }
}
