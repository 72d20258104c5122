//! The pausable copy between real loopback TCP connections: paused mid-stream with bytes waiting both ways
//! and carried on by a second copy from the exported state (as the new process does), half-closes
//! exported and replayed, impossible states refused.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

use super::*;

const T: Duration = Duration::from_secs(10);

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

/// A connected pair of loopback sockets: (the far end, the proxy's end).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (near, _) = listener.accept().await.unwrap();
    (far, near)
}

/// The proxy's two sockets and their far ends: the initiator's app and the server's app.
struct Ends {
    initiator_app: TcpStream,
    server_app: TcpStream,
    initiator: TcpStream,
    server: TcpStream,
}

async fn ends() -> Ends {
    let (initiator_app, initiator) = pair().await;
    let (server_app, server) = pair().await;
    Ends {
        initiator_app,
        server_app,
        initiator,
        server,
    }
}

/// Runs `copy` on the two sockets in a task until it ends or `pause` turns true; gives everything back.
fn spawn_copy(
    mut copy: Pausable,
    mut initiator: TcpStream,
    mut server: TcpStream,
    mut pause: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(Outcome, Pausable, TcpStream, TcpStream)> {
    tokio::spawn(async move {
        let outcome = copy.run(&mut initiator, &mut server, &mut pause).await;
        (outcome, copy, initiator, server)
    })
}

/// Reads `s` to EOF.
async fn read_all(mut s: tokio::net::tcp::OwnedReadHalf) -> Vec<u8> {
    let mut got = Vec::new();
    timeout(T, s.read_to_end(&mut got))
        .await
        .expect("EOF in time")
        .unwrap();
    got
}

#[tokio::test]
async fn a_copy_paused_with_bytes_waiting_both_ways_carries_on_from_its_state_with_every_byte_once()
{
    const LEN: usize = 4 << 20;
    let (up_bytes, down_bytes) = (bytes(1, LEN), bytes(2, LEN));
    let e = ends().await;
    let (initiator_r, mut initiator_w) = e.initiator_app.into_split();
    let (server_r, mut server_w) = e.server_app.into_split();
    // Both apps write much more than the sockets hold and read nothing yet: the copy fills the far
    // sockets and is left holding read bytes it cannot write, both ways.
    let writers = {
        let (up, down) = (up_bytes.clone(), down_bytes.clone());
        tokio::spawn(async move {
            let (a, b) = tokio::join!(
                async {
                    initiator_w.write_all(&up).await?;
                    initiator_w.shutdown().await
                },
                async {
                    server_w.write_all(&down).await?;
                    server_w.shutdown().await
                },
            );
            a.and(b)
        })
    };
    let (pause_tx, pause) = watch::channel(false);
    let first = spawn_copy(Pausable::new(), e.initiator, e.server, pause);
    tokio::time::sleep(Duration::from_millis(300)).await;
    pause_tx.send_replace(true);
    let (outcome, copy, initiator, server) = timeout(T, first).await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Paused), "{outcome:?}");
    let state = copy.export();
    drop(copy);
    for (name, half) in [("up", &state.to_server), ("down", &state.to_initiator)] {
        assert!(
            !half.pending.is_empty() && half.pending.len() <= BUFFER,
            "{name}: {} bytes waiting",
            half.pending.len()
        );
        assert!(!half.eof && !half.shut, "{name}: {half:?}");
    }

    // The new process's copy, from the exported state alone, on the same sockets.
    let resumed = Pausable::resume(&state).unwrap();
    assert_eq!(resumed.export(), state);
    let (_never, pause) = watch::channel(false);
    let second = spawn_copy(resumed, initiator, server, pause);
    let (at_server, at_initiator) = tokio::join!(read_all(server_r), read_all(initiator_r));
    timeout(T, writers).await.unwrap().unwrap().unwrap();
    let (outcome, ..) = timeout(T, second).await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Done(Ok(()))), "{outcome:?}");
    // Delivered before the pause, then the exported bytes, then the rest: each byte once, in order.
    assert!(
        at_server == up_bytes,
        "initiator → server: {} of {LEN} bytes, or out of order",
        at_server.len()
    );
    assert!(
        at_initiator == down_bytes,
        "server → initiator: {} of {LEN} bytes, or out of order",
        at_initiator.len()
    );
}

#[tokio::test]
async fn a_half_close_is_exported_and_the_copy_carries_on_the_other_way() {
    let mut e = ends().await;
    e.initiator_app.write_all(b"hello").await.unwrap();
    e.initiator_app.shutdown().await.unwrap();
    let (pause_tx, pause) = watch::channel(false);
    let first = spawn_copy(Pausable::new(), e.initiator, e.server, pause);
    let mut got = Vec::new();
    timeout(T, e.server_app.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello", "the EOF is passed on after the bytes");
    pause_tx.send_replace(true);
    let (outcome, copy, initiator, server) = timeout(T, first).await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Paused), "{outcome:?}");
    let state = copy.export();
    let passed_on = Half {
        pending: Vec::new(),
        eof: true,
        shut: true,
    };
    assert_eq!(state.to_server, passed_on);
    assert_eq!(state.to_initiator, Half::default());

    // Carried on: the other direction still flows, and ends the copy when it ends.
    let (_never, pause) = watch::channel(false);
    let second = spawn_copy(Pausable::resume(&state).unwrap(), initiator, server, pause);
    e.server_app.write_all(b"world").await.unwrap();
    e.server_app.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(T, e.initiator_app.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"world");
    let (outcome, ..) = timeout(T, second).await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Done(Ok(()))), "{outcome:?}");
}

#[tokio::test]
async fn an_eof_read_but_not_yet_passed_on_is_replayed_after_the_bytes_before_it() {
    let mut e = ends().await;
    let state = State {
        to_server: Half {
            pending: b"tail".to_vec(),
            eof: true,
            shut: false,
        },
        to_initiator: Half {
            pending: b"head".to_vec(),
            eof: false,
            shut: false,
        },
    };
    let (_never, pause) = watch::channel(false);
    let copy = spawn_copy(
        Pausable::resume(&state).unwrap(),
        e.initiator,
        e.server,
        pause,
    );
    let mut got = Vec::new();
    timeout(T, e.server_app.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"tail", "the waiting bytes, then the EOF");
    e.server_app.write_all(b" and more").await.unwrap();
    e.server_app.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(T, e.initiator_app.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"head and more");
    let (outcome, ..) = timeout(T, copy).await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Done(Ok(()))), "{outcome:?}");
}

#[tokio::test]
async fn a_copy_told_to_pause_before_it_starts_reads_nothing() {
    let mut e = ends().await;
    e.initiator_app.write_all(b"unread").await.unwrap();
    let (_paused, pause) = watch::channel(true);
    let (outcome, copy, mut initiator, _server) =
        spawn_copy(Pausable::new(), e.initiator, e.server, pause)
            .await
            .unwrap();
    assert!(matches!(outcome, Outcome::Paused));
    assert_eq!(copy.export(), State::default());
    let mut got = [0u8; 6];
    initiator.read_exact(&mut got).await.unwrap();
    assert_eq!(
        &got, b"unread",
        "the bytes stay in the socket for the next copy"
    );
}

#[test]
fn impossible_states_are_refused() {
    let cases = [
        (
            Half {
                pending: vec![0; BUFFER + 1],
                ..Half::default()
            },
            "more than",
        ),
        (
            Half {
                shut: true,
                ..Half::default()
            },
            "impossible",
        ),
        (
            Half {
                pending: b"x".to_vec(),
                eof: true,
                shut: true,
            },
            "impossible",
        ),
    ];
    for (half, want) in cases {
        let state = State {
            to_initiator: half.clone(),
            ..State::default()
        };
        let Err(e) = Pausable::resume(&state) else {
            panic!("accepted {half:?}");
        };
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[tokio::test]
async fn the_copy_is_no_bigger_than_copy_bidirectional() {
    let mut e = ends().await;
    let (_tx, mut pause) = watch::channel(false);
    let mut copy = Pausable::new();
    let ours = std::mem::size_of_val(&copy.run(&mut e.initiator, &mut e.server, &mut pause))
        + std::mem::size_of::<Pausable>();
    let tokio = std::mem::size_of_val(&tokio::io::copy_bidirectional(
        &mut e.initiator_app,
        &mut e.server_app,
    ));
    println!("pausable copy: {ours} bytes (future and state); copy_bidirectional: {tokio} bytes");
    assert!(ours <= tokio + 128, "{ours} bytes against {tokio}");
}
