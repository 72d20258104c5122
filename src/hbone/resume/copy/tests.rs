use super::*;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{split, AsyncReadExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

type Halves = (SendStream<Bytes>, RecvStream);

/// An HTTP/2 connection over an in-memory pipe: a way to open stream pairs (client half, server half).
struct H2Pair {
    client: h2::client::SendRequest<Bytes>,
    incoming: mpsc::Receiver<(http::Request<RecvStream>, h2::server::SendResponse<Bytes>)>,
}

impl H2Pair {
    async fn new() -> H2Pair {
        let (c, s) = tokio::io::duplex(1 << 20);
        let (tx, incoming) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.expect("server handshake");
            while let Some(Ok(stream)) = conn.accept().await {
                if tx.send(stream).await.is_err() {
                    break;
                }
            }
        });
        let (client, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H2Pair { client, incoming }
    }

    /// One stream: (client's halves, server's halves).
    async fn stream(&mut self) -> (Halves, Halves) {
        let req = http::Request::post("http://test/").body(()).unwrap();
        let (response, client_send) = self
            .client
            .clone()
            .ready()
            .await
            .expect("ready")
            .send_request(req, false)
            .expect("request");
        let (req, mut respond) = self.incoming.recv().await.expect("a stream arrives");
        let server_send = respond
            .send_response(http::Response::new(()), false)
            .expect("respond");
        let client_recv = response.await.expect("response").into_body();
        ((client_send, client_recv), (server_send, req.into_body()))
    }
}

/// One side's proxy end of an application connection, kept across streams (as a handed-over socket is).
struct End {
    read: ReadHalf<DuplexStream>,
    write: WriteHalf<DuplexStream>,
    progress: Progress,
}

impl End {
    fn new(sock: DuplexStream, window: usize) -> End {
        let (read, write) = split(sock);
        End {
            read,
            write,
            progress: Progress::new(window),
        }
    }

    async fn run(
        &mut self,
        (mut send, mut recv): Halves,
        pause: &watch::Receiver<bool>,
    ) -> Outcome {
        run(
            &mut self.read,
            &mut self.write,
            &mut send,
            &mut recv,
            &mut self.progress,
            pause,
        )
        .await
        .expect("copy")
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// An application: writes `data` then closes its side, and reads until the other side closes.
fn app(sock: DuplexStream, data: Vec<u8>) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let (mut r, mut w) = split(sock);
        let writer = async move {
            for chunk in data.chunks(7_777) {
                w.write_all(chunk).await.expect("app write");
            }
            w.shutdown().await.expect("app shutdown");
        };
        let reader = async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("app read");
            got
        };
        tokio::join!(writer, reader).1
    })
}

#[tokio::test]
async fn bytes_go_both_ways_and_the_connection_ends_when_both_sides_close() {
    let mut h2 = H2Pair::new().await;
    let (app_c, proxy_c) = tokio::io::duplex(64 * 1024);
    let (app_s, proxy_s) = tokio::io::duplex(64 * 1024);
    let (up, down) = (pattern(1, 1_000_000), pattern(2, 700_000));
    let (got_s, got_c) = (app(app_s, down.clone()), app(app_c, up.clone()));
    let (mut c, mut s) = (End::new(proxy_c, 64 * 1024), End::new(proxy_s, 64 * 1024));
    let (_keep, never) = watch::channel(false);
    let (hc, hs) = h2.stream().await;
    let (oc, os) = tokio::join!(c.run(hc, &never), s.run(hs, &never));
    assert_eq!(
        oc,
        Outcome::Done(Transferred {
            tcp_to_hbone: 1_000_000,
            hbone_to_tcp: 700_000
        })
    );
    assert_eq!(
        os,
        Outcome::Done(Transferred {
            tcp_to_hbone: 700_000,
            hbone_to_tcp: 1_000_000
        })
    );
    assert!(got_s.await.unwrap() == up, "server app got other bytes");
    assert!(got_c.await.unwrap() == down, "client app got other bytes");
    // Everything acknowledged: nothing kept for a resend.
    assert!(c.progress.log.unacked_bytes().is_empty() && s.progress.log.unacked_bytes().is_empty());
}

/// Pauses the side `which` (0 client, 1 server) every so often while bulk data flows both ways; after
/// each pause the paused side's state goes through export and import (as to a new process) and both
/// sides resume on a new stream from the other's count, as a re-dial would. Every byte arrives once, in
/// order.
async fn moves_lose_and_duplicate_nothing(which: usize) {
    let mut h2 = H2Pair::new().await;
    let (app_c, proxy_c) = tokio::io::duplex(16 * 1024);
    let (app_s, proxy_s) = tokio::io::duplex(16 * 1024);
    let (up, down) = (pattern(3, 3_000_000), pattern(4, 2_000_000));
    let (got_s, got_c) = (app(app_s, down.clone()), app(app_c, up.clone()));
    let mut ends = [End::new(proxy_c, 32 * 1024), End::new(proxy_s, 32 * 1024)];
    let mut moves = 0;
    let outcome = loop {
        let (hc, hs) = h2.stream().await;
        let (pause_tx, pause) = watch::channel(false);
        let (never_tx, never) = watch::channel(false);
        let pauses = [&pause, &never];
        let (pc, ps) = if which == 0 {
            (pauses[0], pauses[1])
        } else {
            (pauses[1], pauses[0])
        };
        let pause_tx = Arc::new(pause_tx);
        let trigger = {
            let tx = pause_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let _ = tx.send(true);
            })
        };
        let [c, s] = &mut ends;
        let (oc, os) = tokio::join!(c.run(hc, pc), s.run(hs, ps));
        trigger.abort();
        drop(never_tx);
        match (oc, os) {
            (Outcome::Done(a), Outcome::Done(b)) => break (a, b),
            (a, b) => {
                let paused = if which == 0 { a } else { b };
                let other = if which == 0 { b } else { a };
                assert_eq!(paused, Outcome::Paused, "the paused side reports the pause");
                assert!(
                    matches!(other, Outcome::PeerMoving | Outcome::PeerLeft),
                    "its peer sees it leave: {other:?}"
                );
            }
        }
        moves += 1;
        assert!(moves < 10_000, "no end after {moves} moves");
        let moved = &mut ends[which].progress;
        let exported = moved.export();
        *moved = Progress::import(&exported.unacked, exported.unwritten, &exported.state)
            .expect("a state this version exported imports");
        let (cc, sc) = (ends[0].progress.received(), ends[1].progress.received());
        ends[0].progress.resume(sc).expect("client resumes");
        ends[1].progress.resume(cc).expect("server resumes");
    };
    assert!(moves >= 3, "only {moves} moves happened");
    assert_eq!(outcome.0.tcp_to_hbone, up.len() as u64);
    assert_eq!(outcome.1.tcp_to_hbone, down.len() as u64);
    assert!(got_s.await.unwrap() == up, "server app got other bytes");
    assert!(got_c.await.unwrap() == down, "client app got other bytes");
}

/// A test that hangs is a failure with a message.
async fn within_a_minute(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the copy neither finished nor failed within a minute");
}

#[tokio::test]
async fn the_client_side_moving_loses_and_duplicates_nothing() {
    within_a_minute(moves_lose_and_duplicate_nothing(0)).await;
}

#[tokio::test]
async fn the_server_side_moving_loses_and_duplicates_nothing() {
    within_a_minute(moves_lose_and_duplicate_nothing(1)).await;
}

#[tokio::test]
async fn a_malformed_frame_ends_the_copy_with_an_error() {
    let mut h2 = H2Pair::new().await;
    let (_app, proxy) = tokio::io::duplex(1024);
    let mut end = End::new(proxy, 1024);
    let ((mut peer_send, _peer_recv), (send, recv)) = h2.stream().await;
    peer_send
        .send_data(Bytes::from_static(&[9, 0, 0, 0, 0, 0, 0, 0, 0]), false)
        .unwrap();
    let (_keep, never) = watch::channel(false);
    let (mut send, mut recv) = (send, recv);
    let err = run(
        &mut end.read,
        &mut end.write,
        &mut send,
        &mut recv,
        &mut end.progress,
        &never,
    )
    .await
    .expect_err("an unknown frame type is refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("unknown"), "{err}");
}

#[tokio::test]
async fn a_peer_whose_copy_failed_ends_the_stream_for_good_and_a_lost_stream_waits_for_its_resume()
{
    let mut h2 = H2Pair::new().await;
    let (_keep, never) = watch::channel(false);
    // A reset with FAILED: over, no resume to wait for.
    let (_app, proxy) = tokio::io::duplex(1024);
    let mut end = End::new(proxy, 1024);
    let ((mut peer_send, _peer_recv), (mut send, mut recv)) = h2.stream().await;
    peer_send.send_reset(FAILED);
    let err = run(
        &mut end.read,
        &mut end.write,
        &mut send,
        &mut recv,
        &mut end.progress,
        &never,
    )
    .await
    .expect_err("a failed peer is an error");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // Any other reset (a stream dropped as its process leaves): the peer left, resumable.
    let (_app, proxy) = tokio::io::duplex(1024);
    let mut end = End::new(proxy, 1024);
    let ((mut peer_send, _peer_recv), halves) = h2.stream().await;
    peer_send.send_reset(Reason::CANCEL);
    assert_eq!(end.run(halves, &never).await, Outcome::PeerLeft);
    // A copy that fails (a malformed frame) resets its stream with FAILED, so its peer does not wait.
    let (_app, proxy) = tokio::io::duplex(1024);
    let mut end = End::new(proxy, 1024);
    let ((mut peer_send, mut peer_recv), (mut send, mut recv)) = h2.stream().await;
    peer_send
        .send_data(Bytes::from_static(&[9, 0, 0, 0, 0, 0, 0, 0, 0]), false)
        .unwrap();
    run(
        &mut end.read,
        &mut end.write,
        &mut send,
        &mut recv,
        &mut end.progress,
        &never,
    )
    .await
    .expect_err("an unknown frame type is refused");
    let reset = loop {
        match peer_recv.data().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e.reason(),
            None => break None,
        }
    };
    assert_eq!(reset, Some(FAILED));
}

#[test]
fn handed_over_state_that_cannot_be_is_refused() {
    let mut p = Progress::new(1024);
    p.log.record(Bytes::from_static(b"abc")).unwrap();
    let e = p.export();
    let (unacked, state) = (e.unacked.clone(), e.state);
    assert!(Progress::import(&unacked, b"", &state).is_ok());
    let bad = |unacked: &[u8], unwritten: &[u8], state: &[u8]| {
        matches!(
            Progress::import(unacked, unwritten, state),
            Err(ResumeError::BadState(_))
        )
    };
    assert!(bad(&unacked, b"", &state[..STATE_LEN - 1]), "short");
    let with = |i: usize, v: u8| {
        let mut s = state;
        s[i] = v;
        s
    };
    assert!(bad(&unacked, b"", &with(0, 9)), "another version");
    assert!(bad(&unacked, b"", &with(1, 0b1000)), "unknown flag");
    assert!(
        bad(&unacked, b"", &with(1, 0b10)),
        "FIN acknowledged, never sent"
    );
    assert!(
        bad(&unacked, b"", &with(1, 0b11)),
        "FIN acknowledged before its bytes"
    );
    assert!(bad(&unacked, b"", &with(2, 0xff)), "window too large");
    assert!(
        bad(&vec![0; 1024 + MAX_DATA + 1], b"", &state),
        "more than a window and a read"
    );
    assert!(
        bad(&unacked, b"x", &state),
        "unwritten bytes never received"
    );
}
