//! Hand-overs of real loopback TCP connections between a sender and a receiver in this process (the 10 000
//! connection one with the connections' app ends in a second process), and peers that misbehave on
//! purpose, written with the protocol's own pieces.

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use prost::Message;

use super::wire::{Ack, Assembler, Batch, Body, End, Hello, Packer, Packet, Reason, Record};
use super::*;

/// Deadline for the fake peers' own reads and writes.
const T: Duration = Duration::from_secs(5);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A socket path in a fresh directory (kept alive by the returned guard).
fn socket_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("handover.sock");
    (dir, path)
}

/// Deterministic bytes, different for each seed.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    ctx.finish().as_ref().to_vec()
}

fn handed(id: u64) -> Handed {
    Handed {
        id,
        pod: format!("Kubernetes//Pod/default/app-{id}"),
        direction: if id % 2 == 0 {
            Direction::Outbound
        } else {
            Direction::Inbound
        },
        original_dst: SocketAddr::from(([10, 0, 0, 2], 8080)),
        peer: SocketAddr::from(([10, 0, 1, 3], 15008)),
        peer_identity: "spiffe://cluster.local/ns/default/sa/app".into(),
        to_app: Vec::new(),
        to_peer: Vec::new(),
        resume: Vec::new(),
    }
}

/// `n` loopback TCP connections: the app's end, and the proxy's end as the fd to hand over.
fn tcp_pairs(n: usize) -> Vec<(TcpStream, OwnedFd)> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let app = TcpStream::connect(addr).expect("connect");
            let (proxy, _) = listener.accept().expect("accept");
            (app, OwnedFd::from(proxy))
        })
        .collect()
}

/// Idle connections with ids 0..n: the app ends, and what the sender hands over.
fn idle(n: usize) -> (Vec<TcpStream>, Vec<(Handed, Fds)>) {
    tcp_pairs(n)
        .into_iter()
        .enumerate()
        .map(|(i, (app, fd))| (app, (handed(i as u64), fd.into())))
        .unzip()
}

/// A proxy end still carries bytes both ways to its app end.
fn still_works(app: &mut TcpStream, proxy: BorrowedFd<'_>, id: u64) {
    let mut proxy = TcpStream::from(proxy.try_clone_to_owned().unwrap());
    proxy.set_read_timeout(Some(T)).unwrap();
    app.set_read_timeout(Some(T)).unwrap();
    let mut got = [0u8; 8];
    proxy.write_all(&id.to_le_bytes()).unwrap();
    app.read_exact(&mut got).unwrap();
    assert_eq!(
        u64::from_le_bytes(got),
        id,
        "proxy → app on connection {id}"
    );
    app.write_all(&(!id).to_le_bytes()).unwrap();
    proxy.read_exact(&mut got).unwrap();
    assert_eq!(
        u64::from_le_bytes(got),
        !id,
        "app → proxy on connection {id}"
    );
}

/// Every connection of `conns` still carries bytes both ways to its app end, `apps[id]`.
fn all_still_work(apps: &mut [TcpStream], conns: &[(Handed, Fds)]) {
    for (handed, fd) in conns {
        still_works(&mut apps[handed.id as usize], fd.as_fd(), handed.id);
    }
}

/// Sends `conns` to a [`Receiver`] in the same process over a real unix socket.
fn hand_over(conns: Vec<(Handed, Fds)>) -> (SendReport, Received) {
    runtime().block_on(async {
        let (_dir, path) = socket_path();
        let receiver = Receiver::bind(&path).unwrap();
        tokio::join!(send(&path, conns), receiver.accept_all())
    })
}

fn ids(conns: &[(Handed, Fds)]) -> Vec<u64> {
    conns.iter().map(|(h, _)| h.id).collect()
}

/// Connects to the receiver at `path` as the sender does.
async fn connect(path: &Path) -> SeqpacketConn {
    with_send_buffer(SeqpacketConn::connect(path).await.unwrap())
}

/// Accepts a sender as the receiver does.
async fn accept(listener: &SeqpacketListener) -> SeqpacketConn {
    with_send_buffer(listener.accept().await.unwrap())
}

async fn put(conn: &SeqpacketConn, body: Body, fds: &[BorrowedFd<'_>]) {
    write(conn, body.into_packet(), fds, T, "test")
        .await
        .unwrap();
}

async fn get(conn: &SeqpacketConn) -> (Body, Vec<OwnedFd>) {
    let mut buf = vec![0u8; MAX_PACKET];
    read_with_fds(conn, &mut buf, T, "test").await.unwrap()
}

fn hello(version: u32, connections: u64) -> Body {
    Body::Hello(Hello {
        version,
        connections,
    })
}

/// The first (and, with `more` false, only) record of connection `id`.
fn first(id: u64, more: bool, to_app: Vec<u8>) -> Record {
    Record {
        id,
        more,
        pod: "pod".into(),
        direction: wire::WireDirection::Outbound as i32,
        original_dst: "10.0.0.2:8080".into(),
        peer: "10.0.1.3:15008".into(),
        to_app,
        ..Record::default()
    }
}

fn batch(seq: u64, records: Vec<Record>) -> Body {
    Body::Batch(Batch { seq, records })
}

/// A receiver written with the protocol's pieces that acknowledges the first `acks` batches and then
/// closes the socket on the next one (as if killed). Returns what it took.
async fn receiver_that_dies_after(listener: SeqpacketListener, acks: usize) -> Vec<(Handed, Fds)> {
    let conn = accept(&listener).await;
    let Body::Hello(h) = get(&conn).await.0 else {
        panic!("hello first")
    };
    put(&conn, hello(h.version, 0), &[]).await;
    let mut assembler = Assembler::new(h.connections, h.version).unwrap();
    let mut taken = Vec::new();
    for _ in 0..acks {
        let (Body::Batch(b), fds) = get(&conn).await else {
            panic!("a batch")
        };
        let seq = b.seq;
        let done = assembler.apply(b, fds).unwrap();
        let accepted = done.len() as u64;
        put(&conn, Body::Ack(Ack { seq, accepted }), &[]).await;
        taken.extend(done);
    }
    let (Body::Batch(_), _fds) = get(&conn).await else {
        panic!("a batch")
    };
    taken
}

#[test]
fn handed_over_connections_carry_on_with_every_byte_exactly_once() {
    // Connection 0 carries every buffer at its bound (so its bytes span several records and packets);
    // the others, smaller amounts.
    const N: usize = 6;
    struct Streams {
        app_to_proxy: Vec<Vec<u8>>,
        proxy_to_app: Vec<Vec<u8>>,
    }
    let sizes = |i: usize| {
        if i == 0 {
            (MAX_BUFFERED, MAX_BUFFERED, MAX_RESUME)
        } else {
            (1000 * i + 1, 700 * i + 3, 10 * i)
        }
    };
    let mut apps = Vec::new();
    let mut conns = Vec::new();
    let mut streams = Streams {
        app_to_proxy: vec![Vec::new(); N],
        proxy_to_app: vec![Vec::new(); N],
    };
    for (i, (mut app, fd)) in tcp_pairs(N).into_iter().enumerate() {
        let id = i as u64;
        let (buffered_to_peer, buffered_to_app, resume) = sizes(i);
        let mut old = TcpStream::from(fd);
        // The old proxy read `a1` from the app and had not forwarded it yet (to_peer).
        let a1 = bytes(id * 10 + 1, buffered_to_peer);
        std::thread::scope(|s| {
            s.spawn(|| app.write_all(&a1).unwrap());
            let mut read = vec![0u8; a1.len()];
            old.read_exact(&mut read).unwrap();
            assert_eq!(read, a1);
        });
        // `a2`: written by the app before the hand-over, read by nobody yet.
        let a2 = bytes(id * 10 + 2, 3000);
        app.write_all(&a2).unwrap();
        // `b1`: written by the old proxy to the app; `b2`: received from the peer, not yet written (to_app).
        let b1 = bytes(id * 10 + 3, 2000);
        old.write_all(&b1).unwrap();
        let b2 = bytes(id * 10 + 4, buffered_to_app);
        streams.app_to_proxy[i] = [a1.clone(), a2].concat();
        streams.proxy_to_app[i] = [b1, b2.clone()].concat();
        let record = Handed {
            to_peer: a1,
            to_app: b2,
            resume: bytes(id * 10 + 5, resume),
            ..handed(id)
        };
        conns.push((record, OwnedFd::from(old).into()));
        apps.push(app);
    }
    let sent: Vec<Handed> = conns.iter().map(|(h, _)| h.clone()).collect();

    let (report, received) = hand_over(conns);
    assert!(report.error.is_none(), "sender: {:?}", report.error);
    assert!(received.error.is_none(), "receiver: {:?}", received.error);
    assert_eq!(report.taken, (0..N as u64).collect::<Vec<_>>());
    assert!(report.kept.is_empty());
    assert!(report.packets >= 3, "connection 0 alone spans 3 packets");
    let got: Vec<Handed> = received.conns.iter().map(|(h, _)| h.clone()).collect();
    assert_eq!(got, sent, "records arrive intact, buffers and all");

    // The new proxy writes what was pending for the app and more (`b3`), and reads the rest of what the
    // app wrote (`a2`, and `a3`, written after the hand-over); both sides compare checksums.
    std::thread::scope(|s| {
        for ((handed, fd), (i, mut app)) in
            received.conns.into_iter().zip(apps.into_iter().enumerate())
        {
            let id = handed.id;
            let a3 = bytes(id * 10 + 6, 5000);
            let b3 = bytes(id * 10 + 7, 4000);
            let want_at_proxy = sha256(&[&streams.app_to_proxy[i], &a3]);
            let want_at_app = sha256(&[&streams.proxy_to_app[i], &b3]);
            s.spawn(move || {
                app.set_read_timeout(Some(T)).unwrap();
                app.write_all(&a3).unwrap();
                app.shutdown(Shutdown::Write).unwrap();
                let mut seen = Vec::new();
                app.read_to_end(&mut seen).unwrap();
                assert_eq!(
                    sha256(&[&seen]),
                    want_at_app,
                    "app's view of connection {id}"
                );
            });
            s.spawn(move || {
                let new = TcpStream::from(fd.app);
                new.set_read_timeout(Some(T)).unwrap();
                let mut rest = Vec::new();
                std::thread::scope(|inner| {
                    inner.spawn(|| {
                        (&new).write_all(&handed.to_app).unwrap();
                        (&new).write_all(&b3).unwrap();
                        new.shutdown(Shutdown::Write).unwrap();
                    });
                    (&new).read_to_end(&mut rest).unwrap();
                });
                let seen = sha256(&[&handed.to_peer, &rest]);
                assert_eq!(seen, want_at_proxy, "new proxy's view of connection {id}");
            });
        }
    });
}

#[test]
fn an_empty_hand_over_completes() {
    let (report, received) = hand_over(Vec::new());
    assert!(report.error.is_none() && received.error.is_none());
    assert!(report.taken.is_empty() && report.kept.is_empty() && received.conns.is_empty());
    assert_eq!((report.packets, received.packets), (0, 0));
}

#[test]
fn a_receiver_that_dies_mid_way_leaves_the_sender_every_unacknowledged_connection() {
    // 520 connections: batches of 253, 253 and 14. The receiver takes the first and dies on the second.
    let _ = crate::app::raise_fd_limit();
    let (mut apps, conns) = idle(520);
    let (report, taken) = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let listener = packet::bind(&path).unwrap();
        tokio::join!(send(&path, conns), receiver_that_dies_after(listener, 1))
    });
    assert!(
        matches!(report.error, Some(Error::Closed { .. })),
        "{:?}",
        report.error
    );
    assert_eq!(report.taken, (0..253).collect::<Vec<_>>());
    assert_eq!(
        ids(&taken),
        report.taken,
        "the receiver has what it acknowledged"
    );
    assert_eq!(ids(&report.kept), (253..520).collect::<Vec<_>>());
    all_still_work(&mut apps, &taken);
    all_still_work(&mut apps, &report.kept);
}

/// Hands 3 idle connections, with deadline `t`, to a fake receiver that says hello, reads batch 0 (all
/// 3 of them) and answers it with `ack`, or not at all. Checks that the sender says `Abort` next and keeps
/// every connection, each still working; returns its report.
fn sender_given_ack(ack: Option<Ack>, t: Duration) -> SendReport {
    let (mut apps, conns) = idle(3);
    let (report, after) = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let listener = packet::bind(&path).unwrap();
        let receiver = async {
            let conn = accept(&listener).await;
            get(&conn).await;
            put(&conn, hello(OLDEST_VERSION, 0), &[]).await;
            let (Body::Batch(b), fds) = get(&conn).await else {
                panic!("a batch")
            };
            assert_eq!((b.seq, fds.len()), (0, 3));
            if let Some(ack) = ack {
                put(&conn, Body::Ack(ack), &[]).await;
            }
            // The next thing the sender says must withdraw the batch.
            get(&conn).await.0
        };
        tokio::join!(sender::send(&path, conns, t), receiver)
    });
    assert!(matches!(after, Body::Abort(_)), "got {}", after.name());
    assert!(report.taken.is_empty());
    assert_eq!(ids(&report.kept), [0, 1, 2]);
    all_still_work(&mut apps, &report.kept);
    report
}

#[test]
fn a_receiver_that_stops_answering_leaves_the_sender_its_batch_and_hears_abort() {
    let report = sender_given_ack(None, Duration::from_millis(200));
    assert!(
        matches!(
            report.error,
            Some(Error::Timeout {
                during: "waiting for an ack"
            })
        ),
        "{:?}",
        report.error
    );
}

#[test]
fn an_ack_for_another_batch_or_count_fails_the_sender_which_keeps_the_batch_and_says_abort() {
    // (seq, accepted) of the ack, for a batch 0 that completed 3 connections.
    for (seq, accepted) in [(1, 3), (0, 2)] {
        let report = sender_given_ack(Some(Ack { seq, accepted }), IO_TIMEOUT);
        assert!(
            matches!(
                report.error,
                Some(Error::BadAck {
                    seq: 0,
                    expected: 3,
                    got_seq,
                    got,
                }) if (got_seq, got) == (seq, accepted)
            ),
            "{:?}",
            report.error
        );
    }
}

#[test]
fn a_sender_that_dies_after_an_ack_leaves_the_receiver_what_it_acknowledged() {
    let (mut apps, conns) = idle(3);
    let received = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let receiver = Receiver::bind(&path).unwrap();
        let dying = async {
            let conn = connect(&path).await;
            put(&conn, hello(PROTOCOL_VERSION, 3), &[]).await;
            get(&conn).await;
            let fds = [conns[0].1.as_fd(), conns[1].1.as_fd()];
            let records = vec![first(0, false, vec![]), first(1, false, vec![])];
            put(&conn, batch(0, records), &fds).await;
            let Body::Ack(ack) = get(&conn).await.0 else {
                panic!("an ack")
            };
            assert_eq!(ack.accepted, 2);
            // Dies here: its copies of the sockets go with it.
        };
        tokio::join!(receiver.accept_all(), dying).0
    });
    drop(conns);
    assert!(
        matches!(received.error, Some(Error::Closed { .. })),
        "{:?}",
        received.error
    );
    assert_eq!(ids(&received.conns), [0, 1]);
    all_still_work(&mut apps, &received.conns);
}

#[test]
fn an_aborting_sender_takes_back_the_batch_it_had_no_ack_for() {
    let (_apps, conns) = idle(4);
    let received = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let receiver = Receiver::bind(&path).unwrap();
        let aborting = async {
            let conn = connect(&path).await;
            put(&conn, hello(PROTOCOL_VERSION, 4), &[]).await;
            get(&conn).await;
            for seq in 0..2u64 {
                let (a, b) = (2 * seq, 2 * seq + 1);
                let fds = [conns[a as usize].1.as_fd(), conns[b as usize].1.as_fd()];
                let records = vec![first(a, false, vec![]), first(b, false, vec![])];
                put(&conn, batch(seq, records), &fds).await;
                get(&conn).await;
            }
            let reason = Reason {
                reason: "gave up".into(),
            };
            put(&conn, Body::Abort(reason), &[]).await;
        };
        tokio::join!(receiver.accept_all(), aborting).0
    });
    assert!(
        matches!(&received.error, Some(Error::Aborted(r)) if r == "gave up"),
        "{:?}",
        received.error
    );
    assert_eq!(
        ids(&received.conns),
        [0, 1],
        "batch 1 went back to the sender"
    );
}

#[test]
fn a_receiver_of_another_version_is_refused_and_the_sender_keeps_everything() {
    let (mut apps, conns) = idle(2);
    let report = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let listener = packet::bind(&path).unwrap();
        let newer = async {
            let conn = accept(&listener).await;
            get(&conn).await;
            put(&conn, hello(PROTOCOL_VERSION + 1, 0), &[]).await;
            let _ = read_with_fds(&conn, &mut [0u8; 64], T, "test").await;
        };
        tokio::join!(send(&path, conns), newer).0
    });
    assert!(
        matches!(report.error, Some(Error::Version { ours: 1, theirs: 3 })),
        "{:?}",
        report.error
    );
    assert_eq!((report.packets, ids(&report.kept)), (0, vec![0, 1]));
    all_still_work(&mut apps, &report.kept);
}

#[test]
fn a_sender_of_another_version_is_refused_by_the_receiver() {
    let (received, answers) = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let receiver = Receiver::bind(&path).unwrap();
        let older = async {
            let conn = connect(&path).await;
            put(&conn, hello(99, 1), &[]).await;
            (get(&conn).await.0, get(&conn).await.0)
        };
        tokio::join!(receiver.accept_all(), older)
    });
    assert!(
        matches!(
            received.error,
            Some(Error::Version {
                ours: PROTOCOL_VERSION,
                theirs: 99
            })
        ),
        "{:?}",
        received.error
    );
    assert!(matches!(
        answers.0,
        Body::Hello(Hello {
            version: PROTOCOL_VERSION,
            ..
        })
    ));
    assert!(matches!(answers.1, Body::Refuse(_)));
}

/// Sends `packet` (raw bytes) with `fds` after a hello announcing `announced` connections; returns the
/// receiver's outcome and its answer to the packet.
fn receiver_given(announced: u64, packet: Vec<u8>, fds: &[BorrowedFd<'_>]) -> (Received, Body) {
    runtime().block_on(async {
        let (_dir, path) = socket_path();
        let receiver = Receiver::bind(&path).unwrap();
        let sender = async {
            let conn = connect(&path).await;
            put(&conn, hello(PROTOCOL_VERSION, announced), &[]).await;
            get(&conn).await;
            write(&conn, packet, fds, T, "test").await.unwrap();
            get(&conn).await.0
        };
        tokio::join!(receiver.accept_all(), sender)
    })
}

#[test]
fn a_batch_whose_fds_do_not_match_its_records_is_refused() {
    let (_apps, conns) = idle(2);
    let records = vec![first(0, false, vec![]), first(1, false, vec![])];
    let (received, answer) =
        receiver_given(2, batch(0, records).into_packet(), &[conns[0].1.as_fd()]);
    assert!(
        matches!(
            received.error,
            Some(Error::FdCount {
                expected: 2,
                got: 1
            })
        ),
        "{:?}",
        received.error
    );
    assert!(received.conns.is_empty());
    assert!(matches!(answer, Body::Refuse(_)));

    let fds = [conns[0].1.as_fd(), conns[1].1.as_fd()];
    let (received, _) = receiver_given(1, Body::End(End {}).into_packet(), &fds);
    assert!(
        matches!(
            received.error,
            Some(Error::FdCount {
                expected: 0,
                got: 2
            })
        ),
        "fds with a message that takes none: {:?}",
        received.error
    );
}

#[test]
fn an_ack_from_the_sender_where_a_batch_belongs_is_refused_as_unexpected() {
    let ack = Body::Ack(Ack {
        seq: 0,
        accepted: 0,
    });
    let (received, answer) = receiver_given(1, ack.into_packet(), &[]);
    assert!(
        matches!(
            received.error,
            Some(Error::Unexpected {
                expected: "a batch or end",
                got: "ack"
            })
        ),
        "{:?}",
        received.error
    );
    assert!(received.conns.is_empty());
    assert!(
        matches!(&answer, Body::Refuse(r) if r.reason == "expected a batch or end, got ack"),
        "got {}",
        answer.name()
    );
}

#[test]
fn a_packet_longer_than_the_bound_is_refused_as_truncated() {
    let (received, answer) = receiver_given(1, vec![0x12; MAX_PACKET + 1], &[]);
    assert!(
        matches!(
            received.error,
            Some(Error::Truncated {
                max: MAX_PACKET,
                fds: 0
            })
        ),
        "{:?}",
        received.error
    );
    assert!(matches!(answer, Body::Refuse(_)));
}

#[test]
fn a_packet_that_is_not_protobuf_is_refused_as_undecodable() {
    let (received, _) = receiver_given(1, vec![0xff; 16], &[]);
    assert!(
        matches!(received.error, Some(Error::Decode(_))),
        "{:?}",
        received.error
    );
}

#[test]
fn a_connection_over_its_bounds_is_refused_before_anything_is_sent() {
    let (_apps, mut conns) = idle(2);
    conns[1].0.to_app = vec![0; MAX_BUFFERED + 1];
    let report = runtime().block_on(send(Path::new("/nonexistent/handover.sock"), conns));
    assert!(
        matches!(
            report.error,
            Some(Error::TooLarge {
                id: 1,
                field: "to_app",
                ..
            })
        ),
        "{:?}",
        report.error
    );
    assert_eq!((report.packets, ids(&report.kept)), (0, vec![0, 1]));
}

#[test]
fn a_sender_with_no_receiver_at_the_path_fails_to_connect_and_keeps_everything() {
    let (mut apps, conns) = idle(2);
    let (_dir, path) = socket_path();
    let report = runtime().block_on(send(&path, conns));
    assert!(
        matches!(
            &report.error,
            Some(Error::Io {
                during: "connecting to the receiver",
                source,
            }) if source.kind() == std::io::ErrorKind::NotFound
        ),
        "{:?}",
        report.error
    );
    assert!(report.taken.is_empty());
    assert_eq!((report.packets, ids(&report.kept)), (0, vec![0, 1]));
    all_still_work(&mut apps, &report.kept);
}

#[test]
fn a_continuation_that_grows_a_buffer_past_its_bound_is_refused() {
    const CONTINUATIONS: u64 = (MAX_BUFFERED - 40_000) as u64 / 30_000 + 1;
    let (_apps, conns) = idle(1);
    let received = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let receiver = Receiver::bind(&path).unwrap();
        let sender = async {
            let conn = connect(&path).await;
            put(&conn, hello(PROTOCOL_VERSION, 1), &[]).await;
            get(&conn).await;
            let start = first(0, true, vec![1; 40_000]);
            put(&conn, batch(0, vec![start]), &[conns[0].1.as_fd()]).await;
            let Body::Ack(ack) = get(&conn).await.0 else {
                panic!("an ack")
            };
            assert_eq!(ack.accepted, 0, "nothing complete yet");
            // Continuations of 30 000 bytes, each in a batch of its own, until the bound is passed.
            for seq in 1..=CONTINUATIONS {
                let more = Record {
                    id: 0,
                    continued: true,
                    more: true,
                    to_app: vec![2; 30_000],
                    ..Record::default()
                };
                put(&conn, batch(seq, vec![more]), &[]).await;
                let answer = get(&conn).await.0;
                if seq == CONTINUATIONS {
                    return answer;
                }
                assert!(
                    matches!(answer, Body::Ack(_)),
                    "within the bound: {answer:?}"
                );
            }
            unreachable!()
        };
        tokio::join!(receiver.accept_all(), sender).0
    });
    assert!(
        matches!(
            received.error,
            Some(Error::TooLarge {
                id: 0,
                field: "to_app",
                len,
                max: MAX_BUFFERED
            }) if len == 40_000 + 30_000 * CONTINUATIONS as usize
        ),
        "{:?}",
        received.error
    );
    assert!(received.conns.is_empty());
}

#[test]
fn packets_stay_within_253_fds_and_the_size_bound_and_reassemble_exactly() {
    // 600 idle connections, then five at every bound, then 10 idle: the packer's cuts, checked by the
    // receiver's assembler without any socket.
    let file = std::fs::File::open("/dev/null").unwrap();
    let mut queue: VecDeque<(Handed, Fds)> = VecDeque::new();
    for id in 0..615u64 {
        let mut h = handed(id);
        if (600..605).contains(&id) {
            h.pod = "p".repeat(MAX_NAME);
            h.peer_identity = "i".repeat(MAX_NAME);
            h.to_app = bytes(id, MAX_BUFFERED);
            h.to_peer = bytes(id + 1000, MAX_BUFFERED);
            h.resume = bytes(id + 2000, MAX_RESUME);
        }
        queue.push_back((h, OwnedFd::from(file.try_clone().unwrap()).into()));
    }
    let want: Vec<Handed> = queue.iter().map(|(h, _)| h.clone()).collect();
    let mut packer = Packer::default();
    let mut assembler = Assembler::new(queue.len() as u64, PROTOCOL_VERSION).unwrap();
    let mut got = Vec::new();
    let mut packets = 0;
    while let Some(packed) = packer.next(&queue) {
        packets += 1;
        assert!(
            packed.bytes.len() <= MAX_PACKET,
            "{} bytes",
            packed.bytes.len()
        );
        assert!(packed.fds.len() <= MAX_FDS_PER_PACKET);
        let Some(Body::Batch(b)) = Packet::decode(&packed.bytes[..]).unwrap().body else {
            panic!("a batch")
        };
        let fds = packed
            .fds
            .iter()
            .map(|&i| queue[i].1.app.try_clone().unwrap())
            .collect();
        let done = assembler.apply(b, fds).unwrap();
        assert_eq!(done.len(), packed.completed);
        got.extend(done.into_iter().map(|(h, _)| h));
        queue.drain(..packed.completed);
        packer.taken(packed.completed);
    }
    assembler.finish().unwrap();
    assert_eq!(got, want);
    // 600 idle: 3 packets by the fd bound; the five at every bound in 16 KiB records, three to a packet.
    let full = (5 * (2 * MAX_BUFFERED + MAX_RESUME + 2 * MAX_NAME)).div_ceil(3 * 16 * 1024);
    assert!(
        (full - 5..=full + 10).contains(&(packets - 3)),
        "{packets} packets (about {} expected)",
        full + 3
    );
}

#[test]
fn a_hand_over_announcing_more_than_the_connection_bound_is_refused() {
    assert!(Assembler::new(MAX_CONNECTIONS, PROTOCOL_VERSION).is_ok());
    let err = Assembler::new(MAX_CONNECTIONS + 1, PROTOCOL_VERSION).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooMany {
                announced,
                max: MAX_CONNECTIONS
            } if announced == MAX_CONNECTIONS + 1
        ),
        "{err:?}"
    );
}

#[test]
fn batches_out_of_order_or_with_bad_records_are_refused_as_malformed() {
    let null = std::fs::File::open("/dev/null").unwrap();
    let continued = |id: u64| Record {
        id,
        continued: true,
        to_app: vec![1],
        ..Record::default()
    };
    let with = |change: fn(&mut Record)| {
        let mut record = first(0, false, vec![]);
        change(&mut record);
        record
    };
    let at = |seq: u64, records: Vec<Record>| Batch { seq, records };
    // Connections announced; batches, applied in order; whether `End` follows them; and the message of the
    // last step (the last batch, or `End`), every step before it succeeding.
    let cases: Vec<(u64, Vec<Batch>, bool, &str)> = vec![
        (
            1,
            vec![at(1, vec![first(0, false, vec![])])],
            false,
            "batch 1 out of order: expected batch 0",
        ),
        (1, vec![at(0, vec![])], false, "batch 0 is empty"),
        (
            2,
            vec![at(
                0,
                vec![first(0, true, vec![1]), first(1, false, vec![])],
            )],
            false,
            "connection 1 starts before connection 0 ends",
        ),
        (
            1,
            vec![at(0, vec![continued(5)])],
            false,
            "record continues connection 5, which is not the one being received",
        ),
        (
            2,
            vec![
                at(0, vec![first(0, true, vec![1])]),
                at(1, vec![continued(1)]),
            ],
            false,
            "record continues connection 1, which is not the one being received",
        ),
        (
            1,
            vec![
                at(0, vec![first(0, true, vec![1])]),
                at(
                    1,
                    vec![Record {
                        pod: "pod".into(),
                        ..continued(0)
                    }],
                ),
            ],
            false,
            "continuation of connection 0 carries metadata",
        ),
        (
            1,
            vec![at(
                0,
                vec![first(0, false, vec![]), first(1, false, vec![])],
            )],
            false,
            "more connections than the 1 announced",
        ),
        (
            1,
            vec![at(0, vec![with(|r| r.direction = 0)])],
            false,
            "connection 0: direction 0 unknown",
        ),
        (
            1,
            vec![at(0, vec![with(|r| r.direction = 7)])],
            false,
            "connection 0: direction 7 unknown",
        ),
        (
            1,
            vec![at(0, vec![with(|r| r.original_dst = "1".repeat(65))])],
            false,
            "connection 0: original_dst longer than 64 bytes",
        ),
        (
            1,
            vec![at(0, vec![with(|r| r.peer = "nowhere".into())])],
            false,
            "connection 0: peer \"nowhere\" is not ip:port",
        ),
        (
            1,
            vec![at(0, vec![first(0, true, vec![1])])],
            true,
            "ended in the middle of connection 0",
        ),
        (
            2,
            vec![at(0, vec![first(0, false, vec![])])],
            true,
            "ended after 1 of the 2 connections announced",
        ),
        (
            1,
            vec![],
            true,
            "ended after 0 of the 1 connections announced",
        ),
    ];
    for (announced, batches, end, want) in cases {
        let mut assembler = Assembler::new(announced, PROTOCOL_VERSION).unwrap();
        let steps = batches.len();
        let mut last = Ok(());
        for (step, batch) in batches.into_iter().enumerate() {
            let fds = batch
                .records
                .iter()
                .filter(|r| !r.continued)
                .map(|_| OwnedFd::from(null.try_clone().unwrap()))
                .collect();
            let result = assembler.apply(batch, fds).map(drop);
            if end || step + 1 < steps {
                result.unwrap_or_else(|e| panic!("{want}: batch {step} refused: {e}"));
            } else {
                last = result;
            }
        }
        if end {
            last = assembler.finish();
        }
        match last {
            Err(Error::Malformed(message)) => assert_eq!(message, want),
            other => panic!("{want}: got {other:?}"),
        }
    }
}

/// Connections in the large hand-over.
const MANY: usize = 10_000;
/// Environment of the app-side process of the large hand-over: the proxy's address.
const PEER_ENV: &str = "MESHNODE_HANDOVER_TEST_PEER";

#[test]
fn ten_thousand_connections_all_arrive_and_each_still_works() {
    crate::test_gate::run_alone(module_path!(), "alone_ten_thousand_connections");
}

#[test]
#[ignore = "needs most of the fd limit: run alone by ten_thousand_connections_all_arrive_and_each_still_works"]
fn alone_ten_thousand_connections() {
    // This process holds the proxy ends (the sender's, then the receiver's: the sender closes its copies
    // batch by batch, so about MANY + 253 at once); a second process holds the app ends.
    let (_, hard) = crate::app::raise_fd_limit().expect("raise the fd limit");
    if !crate::test_gate::needs(
        "ten_thousand_connections_all_arrive_and_each_still_works",
        hard >= (MANY + 1000) as u64,
        &format!("the hard fd limit ({hard}) is below {}", MANY + 1000),
    ) {
        return;
    }
    // An accept queue for all of them (std's 128 would let the app ends outrun the accept loop, and
    // dropped SYNs cost a second each).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(MANY as i32).unwrap();
    let listener = TcpListener::from(socket);
    listener.set_nonblocking(true).unwrap();
    let module = module_path!().split_once("::").unwrap().1;
    let mut peer = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &format!("{module}::alone_app_ends_of_ten_thousand_connections"),
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(PEER_ENV, listener.local_addr().unwrap().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut conns = Vec::with_capacity(MANY);
    while conns.len() < MANY {
        match listener.accept() {
            Ok((proxy, peer_addr)) => {
                proxy.set_nonblocking(false).unwrap();
                // The app end's port: unique among these connections, and what the app end sends first.
                let id = u64::from(peer_addr.port());
                conns.push((handed(id), OwnedFd::from(proxy).into()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = peer.try_wait().unwrap() {
                    panic!(
                        "app-side process exited early ({status}) after {} connections",
                        conns.len()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "{} connections after 120 s",
                    conns.len()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    let sent: BTreeSet<u64> = conns.iter().map(|(h, _)| h.id).collect();
    assert_eq!(sent.len(), MANY);

    let started = Instant::now();
    let (report, received) = hand_over(conns);
    let took = started.elapsed();
    assert!(report.error.is_none(), "sender: {:?}", report.error);
    assert!(received.error.is_none(), "receiver: {:?}", received.error);
    assert!(report.kept.is_empty());
    assert_eq!(report.taken.iter().copied().collect::<BTreeSet<_>>(), sent);
    assert_eq!(received.conns.len(), MANY);
    assert_eq!(
        ids(&received.conns).into_iter().collect::<BTreeSet<_>>(),
        sent
    );
    println!(
        "{MANY} connections handed over in {took:?} ({} packets, {} acknowledged)",
        report.packets, received.packets
    );

    // Each socket still works: what the app end wrote before the hand-over (its port) is read here, once,
    // and the answer reaches it.
    for (handed, fd) in received.conns {
        let mut proxy = TcpStream::from(fd.app);
        proxy.set_read_timeout(Some(T)).unwrap();
        assert_eq!(u64::from(proxy.peer_addr().unwrap().port()), handed.id);
        let mut got = [0u8; 8];
        proxy.read_exact(&mut got).unwrap();
        assert_eq!(
            u64::from_le_bytes(got),
            handed.id,
            "first bytes of connection {}",
            handed.id
        );
        proxy.write_all(&(!handed.id).to_le_bytes()).unwrap();
    }
    let out = peer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("1 passed")
            && stdout.contains("app ends: all answered"),
        "app-side process:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "the app-side process of alone_ten_thousand_connections (does nothing without its environment)"]
fn alone_app_ends_of_ten_thousand_connections() {
    let Ok(addr) = std::env::var(PEER_ENV) else {
        return;
    };
    let _ = crate::app::raise_fd_limit();
    let apps: Vec<(u64, TcpStream)> = (0..MANY)
        .map(|_| {
            let mut app = TcpStream::connect(&addr).expect("connect");
            let port = u64::from(app.local_addr().unwrap().port());
            app.write_all(&port.to_le_bytes()).unwrap();
            (port, app)
        })
        .collect();
    for (port, mut app) in apps {
        app.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = [0u8; 8];
        app.read_exact(&mut got).unwrap();
        assert_eq!(
            u64::from_le_bytes(got),
            !port,
            "answer on connection {port}"
        );
    }
    println!("app ends: all answered");
}

#[test]
fn a_receiver_out_of_fd_numbers_refuses_the_batch_and_the_sender_keeps_it() {
    crate::test_gate::run_alone(module_path!(), "alone_receiver_out_of_fd_numbers");
}

#[test]
#[ignore = "lowers the fd limit: run alone by a_receiver_out_of_fd_numbers_refuses_the_batch_and_the_sender_keeps_it"]
fn alone_receiver_out_of_fd_numbers() {
    const N: usize = 100;
    let (mut apps, conns) = idle(N);
    let rt = runtime();
    let (_dir, path) = socket_path();
    let receiver = rt.block_on(async { Receiver::bind(&path) }).unwrap();
    // Room for ten more fds (and whatever holes there are below the highest open one): the sender's
    // socket, the receiver's, and a few of the N the batch carries.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, highest + 10, hard).unwrap();
    let (report, received) =
        rt.block_on(async { tokio::join!(send(&path, conns), receiver.accept_all()) });
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    assert!(
        matches!(received.error, Some(Error::ControlTruncated { .. })),
        "{:?}",
        received.error
    );
    assert!(received.conns.is_empty());
    assert!(
        matches!(&report.error, Some(Error::Refused(r)) if r.contains("MSG_CTRUNC")),
        "{:?}",
        report.error
    );
    assert_eq!(ids(&report.kept), (0..N as u64).collect::<Vec<_>>());
    all_still_work(&mut apps, &report.kept);
}

/// Idle plain connections with ids 0..n, each with two sockets (an app pair and a peer pair): the app ends,
/// the peer ends, and what the sender hands over.
fn idle_plain(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>, Vec<(Handed, Fds)>) {
    let (mut apps, mut peers, mut conns) = (Vec::new(), Vec::new(), Vec::new());
    for (i, ((app, app_fd), (peer, peer_fd))) in
        tcp_pairs(n).into_iter().zip(tcp_pairs(n)).enumerate()
    {
        let h = Handed {
            peer_identity: String::new(),
            to_app: bytes(i as u64, 100 + i),
            to_peer: bytes(i as u64 + 1000, 200 + i),
            ..handed(i as u64)
        };
        let fds = Fds {
            app: app_fd,
            peer: Some(peer_fd),
        };
        apps.push(app);
        peers.push(peer);
        conns.push((h, fds));
    }
    (apps, peers, conns)
}

#[test]
fn plain_connections_arrive_with_both_their_sockets_beside_resumable_ones() {
    // Ids 0..4 plain (two fds), 4..7 resumable (one): mixed in one hand-over, in the given order.
    let (mut apps, mut peers, mut conns) = idle_plain(4);
    let (more_apps, more) = idle(7);
    apps.extend(more_apps.into_iter().skip(4));
    conns.extend(more.into_iter().skip(4));
    let sent: Vec<Handed> = conns.iter().map(|(h, _)| h.clone()).collect();
    let (report, received) = hand_over(conns);
    assert!(report.error.is_none(), "sender: {:?}", report.error);
    assert!(received.error.is_none(), "receiver: {:?}", received.error);
    assert_eq!(report.taken, (0..7).collect::<Vec<_>>());
    assert!(report.kept.is_empty());
    let got: Vec<Handed> = received.conns.iter().map(|(h, _)| h.clone()).collect();
    assert_eq!(got, sent, "records arrive intact");
    for (handed, fds) in &received.conns {
        let id = handed.id;
        still_works(&mut apps[id as usize], fds.app.as_fd(), id);
        match (&fds.peer, id < 4) {
            // The second fd is the peer's socket, not the app's again.
            (Some(peer), true) => still_works(&mut peers[id as usize], peer.as_fd(), id),
            (None, false) => {}
            (peer, _) => panic!("connection {id}: peer socket {peer:?}"),
        }
    }
}

#[test]
fn a_batch_whose_fds_do_not_match_its_plain_records_is_refused() {
    let (_apps, _peers, conns) = idle_plain(2);
    let plain = |id| Record {
        peer_socket: true,
        ..first(id, false, vec![])
    };
    // Two plain connections call for four fds; three came.
    let fds = [
        conns[0].1.app.as_fd(),
        conns[0].1.peer.as_ref().unwrap().as_fd(),
        conns[1].1.app.as_fd(),
    ];
    let records = vec![plain(0), plain(1)];
    let (received, answer) = receiver_given(2, batch(0, records).into_packet(), &fds);
    assert!(
        matches!(
            received.error,
            Some(Error::FdCount {
                expected: 4,
                got: 3
            })
        ),
        "{:?}",
        received.error
    );
    assert!(received.conns.is_empty());
    assert!(matches!(answer, Body::Refuse(_)));

    // A version 1 sender cannot send a second fd: refused as malformed, not taken with one.
    let (received, answer) = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let receiver = Receiver::bind(&path).unwrap();
        let old = async {
            let conn = connect(&path).await;
            put(&conn, hello(OLDEST_VERSION, 1), &[]).await;
            let Body::Hello(h) = get(&conn).await.0 else {
                panic!("hello")
            };
            assert_eq!(
                h.version, OLDEST_VERSION,
                "the receiver answers in the sender's version"
            );
            put(&conn, batch(0, vec![plain(0)]), &fds[..2]).await;
            get(&conn).await.0
        };
        tokio::join!(receiver.accept_all(), old)
    });
    assert!(
        matches!(&received.error, Some(Error::Malformed(m)) if m.contains("second fd")),
        "{:?}",
        received.error
    );
    assert!(received.conns.is_empty());
    assert!(matches!(answer, Body::Refuse(_)));
}

/// A receiver of version 1 (as the previous build): answers hello with 1 and refuses any other version.
/// Returns the version the sender said.
async fn old_receiver(listener: SeqpacketListener) -> u32 {
    let conn = accept(&listener).await;
    let Body::Hello(h) = get(&conn).await.0 else {
        panic!("hello first")
    };
    put(&conn, hello(OLDEST_VERSION, 0), &[]).await;
    if h.version == OLDEST_VERSION {
        // Takes nothing further here: the test only looks at what the sender says.
        let _ = read_with_fds(&conn, &mut vec![0u8; MAX_PACKET], T, "test").await;
    }
    h.version
}

#[test]
fn a_sender_says_version_2_only_with_a_plain_connection_and_an_old_receiver_takes_none_of_it() {
    let (mut apps, mut peers, conns) = idle_plain(2);
    let (said, report) = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let listener = packet::bind(&path).unwrap();
        let (report, said) = tokio::join!(send(&path, conns), old_receiver(listener));
        (said, report)
    });
    assert_eq!(said, PROTOCOL_VERSION);
    assert!(
        matches!(report.error, Some(Error::Version { ours: 2, theirs: 1 })),
        "{:?}",
        report.error
    );
    assert_eq!((report.packets, ids(&report.kept)), (0, vec![0, 1]));
    for (handed, fds) in &report.kept {
        let id = handed.id as usize;
        still_works(&mut apps[id], fds.app.as_fd(), handed.id);
        still_works(
            &mut peers[id],
            fds.peer.as_ref().unwrap().as_fd(),
            handed.id,
        );
    }

    // Resumable connections alone: version 1, which an old receiver speaks.
    let (_apps, conns) = idle(1);
    let said = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let listener = packet::bind(&path).unwrap();
        let sending = async {
            // The old receiver stops after the hello: this sender's batch goes unanswered.
            sender::send(&path, conns, Duration::from_millis(200)).await
        };
        tokio::join!(sending, old_receiver(listener)).1
    });
    assert_eq!(said, OLDEST_VERSION);
}

#[test]
fn pairs_of_fds_pack_within_253_per_packet_never_split_and_arrive_in_order() {
    // 300 connections, every other one plain: the app fd is /dev/null, the peer fd /dev/zero, so the
    // receiver's assignment of fds to connections can be checked.
    let null = std::fs::File::open("/dev/null").unwrap();
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let rdev = |fd: BorrowedFd<'_>| nix::sys::stat::fstat(fd).unwrap().st_rdev;
    let (null_dev, zero_dev) = (rdev(null.as_fd()), rdev(zero.as_fd()));
    let mut queue: VecDeque<(Handed, Fds)> = VecDeque::new();
    for id in 0..300u64 {
        let peer = (id % 2 == 0).then(|| OwnedFd::from(zero.try_clone().unwrap()));
        let app = OwnedFd::from(null.try_clone().unwrap());
        queue.push_back((handed(id), Fds { app, peer }));
    }
    let want: Vec<Handed> = queue.iter().map(|(h, _)| h.clone()).collect();
    let mut packer = Packer::default();
    let mut assembler = Assembler::new(queue.len() as u64, PROTOCOL_VERSION).unwrap();
    let (mut got, mut fd_counts) = (Vec::new(), Vec::new());
    while let Some(packed) = packer.next(&queue) {
        let Some(Body::Batch(b)) = Packet::decode(&packed.bytes[..]).unwrap().body else {
            panic!("a batch")
        };
        let fds: Vec<OwnedFd> = packed
            .fds
            .iter()
            .flat_map(|&i| {
                let f = &queue[i].1;
                std::iter::once(f.app.try_clone().unwrap())
                    .chain(f.peer.as_ref().map(|p| p.try_clone().unwrap()))
            })
            .collect();
        assert!(fds.len() <= MAX_FDS_PER_PACKET, "{} fds", fds.len());
        fd_counts.push(fds.len());
        let done = assembler.apply(b, fds).unwrap();
        assert_eq!(done.len(), packed.completed);
        for (h, f) in &done {
            assert_eq!(rdev(f.app.as_fd()), null_dev, "connection {}: app fd", h.id);
            let peer = f.peer.as_ref().map(|p| rdev(p.as_fd()));
            let expected = (h.id % 2 == 0).then_some(zero_dev);
            assert_eq!(peer, expected, "connection {}: peer fd", h.id);
        }
        got.extend(done.into_iter().map(|(h, _)| h));
        queue.drain(..packed.completed);
        packer.taken(packed.completed);
    }
    assembler.finish().unwrap();
    assert_eq!(got, want);
    // 450 fds: 253 would split a pair (168 connections, the 169th plain, make 252 + 2), so 252, then 198.
    assert_eq!(fd_counts, [252, 198]);
}

#[test]
fn an_old_receiver_is_handed_the_connections_it_understands_and_the_sender_keeps_the_plain_ones() {
    // Ids 0, 2, 4 plain; 1, 3 resumable.
    let (_apps, _peers, plain) = idle_plain(3);
    let (mut apps, single) = idle(5);
    let mut plain = plain.into_iter();
    let mut single = single.into_iter();
    let conns: Vec<(Handed, Fds)> = (0..5u64)
        .map(|id| {
            let (h, fds) = if id % 2 == 0 {
                plain.next().unwrap()
            } else {
                // `idle` numbers its connections 0..5: take 1 and 3, whose app ends are apps[1], apps[3].
                single.nth(1).unwrap()
            };
            (Handed { id, ..h }, fds)
        })
        .collect();
    let (report, (versions, taken)) = runtime().block_on(async {
        let (_dir, path) = socket_path();
        let listener = packet::bind(&path).unwrap();
        // Version 1 as the previous build: refuses version 2 after its hello, then takes a version 1
        // hand-over on the next connection.
        let old = async {
            let mut versions = Vec::new();
            let conn = accept(&listener).await;
            let Body::Hello(h) = get(&conn).await.0 else {
                panic!("hello")
            };
            versions.push(h.version);
            put(&conn, hello(OLDEST_VERSION, 0), &[]).await;
            put(
                &conn,
                Body::Refuse(Reason {
                    reason: "version".into(),
                }),
                &[],
            )
            .await;
            drop(conn);
            let conn = accept(&listener).await;
            let Body::Hello(h) = get(&conn).await.0 else {
                panic!("hello")
            };
            versions.push(h.version);
            put(&conn, hello(OLDEST_VERSION, 0), &[]).await;
            let mut assembler = Assembler::new(h.connections, h.version).unwrap();
            let mut taken = Vec::new();
            loop {
                match get(&conn).await {
                    (Body::Batch(b), fds) => {
                        let seq = b.seq;
                        let done = assembler.apply(b, fds).unwrap();
                        let accepted = done.len() as u64;
                        put(&conn, Body::Ack(Ack { seq, accepted }), &[]).await;
                        taken.extend(done);
                    }
                    (Body::End(_), _) => break,
                    (other, _) => panic!("{}", other.name()),
                }
            }
            (versions, taken)
        };
        tokio::join!(send(&path, conns), old)
    });
    assert_eq!(versions, [PROTOCOL_VERSION, OLDEST_VERSION]);
    assert_eq!(report.taken, [1, 3]);
    assert_eq!(ids(&taken), [1, 3]);
    assert!(taken.iter().all(|(_, fds)| fds.peer.is_none()));
    assert_eq!(ids(&report.kept), [0, 2, 4], "the plain ones, in order");
    assert!(
        matches!(report.error, Some(Error::Version { ours: 2, theirs: 1 })),
        "{:?}",
        report.error
    );
    for (h, fds) in &taken {
        still_works(&mut apps[h.id as usize], fds.app.as_fd(), h.id);
    }
}
