//! ZDS against bytes a real ztunnel sent and accepted (tests/fixtures/ztunnel/zds/, recorded with
//! `record_zds.py` beside them from ztunnel master 62d82653 built with `--features testing`):
//! - meshnode's agent side reads ztunnel's hello and acks (an empty `Ack` is success, ztunnel's NACK text is
//!   relayed), and the requests it sends are byte-identical to the ones ztunnel acknowledged;
//! - meshnode's proxy side sends ztunnel's hello and ztunnel's acks byte for byte, and refuses what ztunnel
//!   refuses (an add without a netns fd, a keep after the snapshot) with a NACK.
//!
//! Needs nothing special (a socket pair and a socket in a temporary directory).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshnode::netns::Netns;
use meshnode::proto::workload::zds::WorkloadInfo;
use meshnode::zds::{
    self, Request, SeqpacketConn, SnapshotEntry, SnapshotSource, ZdsClient, ZdsServer,
};
use prost::Message;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ztunnel/zds")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rec_info() -> WorkloadInfo {
    WorkloadInfo {
        name: "rec".into(),
        namespace: "default".into(),
        service_account: "rec".into(),
    }
}

struct NoPods;
impl SnapshotSource for NoPods {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        Vec::new()
    }
}

/// Reads one packet from `conn`: its bytes and how many fds came with it.
async fn read(conn: &SeqpacketConn) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; zds::MAX_MESSAGE];
    let (len, fds) = tokio::time::timeout(Duration::from_secs(10), conn.recv(&mut buf))
        .await
        .expect("a packet in time")
        .unwrap();
    buf.truncate(len);
    (buf, fds.len())
}

#[tokio::test]
async fn the_agent_side_reads_ztunnels_hello_and_acks_and_sends_what_ztunnel_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    let listener = zds::bind(&path).unwrap();
    let server = ZdsServer::new(Arc::new(NoPods));
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener, stop_rx).await });

    // "ztunnel": connects, says its recorded hello, answers every request with its recorded ack.
    let ztunnel = SeqpacketConn::connect(&path).await.unwrap();
    ztunnel.send(&fixture("hello.bin"), None).await.unwrap();
    let (snapshot, fds) = read(&ztunnel).await;
    assert_eq!(snapshot, fixture("requests/3.bin"), "SnapshotSent");
    assert_eq!(fds, 0);
    ztunnel
        .send(&fixture("ack_snapshot_sent.bin"), None)
        .await
        .unwrap();
    assert!(server.wait_connected(Duration::from_secs(10)).await);

    let fake = Arc::new(ztunnel);
    let answer = |name: &'static str, expect: &'static str, expect_fds: usize| {
        let fake = fake.clone();
        tokio::spawn(async move {
            let (req, fds) = read(&fake).await;
            assert_eq!(req, fixture(expect), "request answered by {name}");
            assert_eq!(fds, expect_fds, "fds with {expect}");
            fake.send(&fixture(name), None).await.unwrap();
        })
    };

    let netns = Netns::current().unwrap();
    let replier = answer("ack_add.bin", "requests/1.bin", 1);
    server
        .add("rec-uid", &rec_info(), &netns)
        .await
        .expect("ztunnel's empty ack is success");
    replier.await.unwrap();

    let replier = answer("ack_del.bin", "requests/4.bin", 0);
    server.del("rec-uid").await.expect("ztunnel's ack of a del");
    replier.await.unwrap();

    // ztunnel's NACK (an error ack with its whole error chain) reaches the caller as a NACK with the text.
    let replier = answer("ack_add_without_fd.bin", "requests/5.bin", 1);
    let err = server
        .add("nofd-uid", &rec_info(), &netns)
        .await
        .unwrap_err();
    replier.await.unwrap();
    let msg = err.to_string();
    assert!(matches!(err, zds::Error::Nack { .. }), "{err:?}");
    assert!(msg.contains("No control message"), "{msg}");
}

async fn agent_sends(agent: &SeqpacketConn, request: &str, fd: Option<&Netns>) {
    use std::os::fd::AsFd;
    agent
        .send(&fixture(request), fd.map(|n| n.as_fd()))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_proxy_side_says_and_acks_exactly_what_ztunnel_does() {
    let (agent, proxy) = SeqpacketConn::pair().unwrap();
    let mut client = ZdsClient::handshake(proxy).await.unwrap();
    assert_eq!(read(&agent).await.0, fixture("hello.bin"));

    let netns = Netns::current().unwrap();
    for (request, fd, ack) in [
        ("requests/1.bin", true, "ack_add.bin"),
        ("requests/2.bin", false, "ack_keep.bin"),
        ("requests/3.bin", false, "ack_snapshot_sent.bin"),
        ("requests/4.bin", false, "ack_del.bin"),
    ] {
        agent_sends(&agent, request, fd.then_some(&netns)).await;
        let got = client
            .recv()
            .await
            .unwrap_or_else(|e| panic!("{request}: {e}"));
        match (request, &got) {
            ("requests/1.bin", Request::Add { uid, info, .. }) => {
                assert_eq!(uid, "rec-uid");
                assert_eq!(info, &rec_info());
            }
            ("requests/2.bin", Request::Keep { uid })
            | ("requests/4.bin", Request::Del { uid }) => {
                assert_eq!(uid, "rec-uid")
            }
            ("requests/3.bin", Request::SnapshotSent) => {}
            _ => panic!("{request} read as {got:?}"),
        }
        client.ack(None).await.unwrap();
        assert_eq!(read(&agent).await.0, fixture(ack), "our ack of {request}");
    }

    // What ztunnel NACKs, we NACK: an add without a netns fd ...
    agent_sends(&agent, "requests/5.bin", None).await;
    let err = client.recv().await.unwrap_err();
    client.ack(Some(&err.to_string())).await.unwrap();
    assert_nack(&read(&agent).await.0, &fixture("ack_add_without_fd.bin"));
}

#[tokio::test]
async fn a_keep_after_the_snapshot_is_refused_as_ztunnel_refuses_it() {
    let (agent, proxy) = SeqpacketConn::pair().unwrap();
    let mut client = ZdsClient::handshake(proxy).await.unwrap();
    assert_eq!(read(&agent).await.0, fixture("hello_again.bin"));
    agent_sends(&agent, "requests/6.bin", None).await;
    assert!(matches!(
        client.recv().await.unwrap(),
        Request::SnapshotSent
    ));
    client.ack(None).await.unwrap();
    assert_eq!(read(&agent).await.0, fixture("ack_snapshot_sent_again.bin"));
    agent_sends(&agent, "requests/7.bin", None).await;
    let err = client.recv().await.unwrap_err();
    client.ack(Some(&err.to_string())).await.unwrap();
    assert_nack(
        &read(&agent).await.0,
        &fixture("ack_keep_after_snapshot.bin"),
    );
}

/// Both are `WorkloadResponse{ack: Ack{error: <non-empty>}}` (the texts differ).
fn assert_nack(ours: &[u8], theirs: &[u8]) {
    use meshnode::proto::workload::zds::{workload_response::Payload, WorkloadResponse};
    for (who, bytes) in [("ours", ours), ("ztunnel's", theirs)] {
        let r = WorkloadResponse::decode(bytes).unwrap_or_else(|e| panic!("{who}: {e}"));
        let Some(Payload::Ack(ack)) = r.payload else {
            panic!("{who}: not an ack: {r:?}");
        };
        assert!(!ack.error.is_empty(), "{who}: an empty error is an ACK");
    }
    // Same envelope: field 1 (ack), length-delimited, whose field 1 (error) is length-delimited.
    assert_eq!(ours[0], theirs[0]);
    let inner = |b: &[u8]| {
        let (_, n) = varint(&b[1..]);
        b[1 + n]
    };
    assert_eq!(inner(ours), inner(theirs));
}

fn varint(b: &[u8]) -> (u64, usize) {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    panic!("truncated varint")
}
