use super::*;

// The whole-frame reading the copy's streaming `Decoder` is checked against (the copy itself reads
// with `Decoder`).
/// One frame of a resumable stream's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    /// Application bytes, the next after everything sent before.
    Data(Bytes),
    /// The sender has taken this many bytes off the stream in all.
    Ack(u64),
    /// The sender is leaving; its count so far. The stream resumes when the client re-dials.
    Moving(u64),
    /// No data after this many bytes: the sender's application closed its side.
    Fin(u64),
}

/// Takes the next whole frame off the front of `src`; `None` until one has arrived. The `DATA` bytes are
/// split off `src` without a copy.
fn decode(src: &mut BytesMut) -> Result<Option<Frame>, ResumeError> {
    let Some(&kind) = src.first() else {
        return Ok(None);
    };
    match kind {
        DATA => {
            if src.len() < DATA_HEAD {
                return Ok(None);
            }
            let len =
                u32::from_be_bytes(src[1..DATA_HEAD].try_into().expect("four bytes")) as usize;
            if len == 0 || len > MAX_DATA {
                return Err(ResumeError::DataLength(len));
            }
            if src.len() < DATA_HEAD + len {
                src.reserve(DATA_HEAD + len - src.len());
                return Ok(None);
            }
            src.advance(DATA_HEAD);
            Ok(Some(Frame::Data(src.split_to(len).freeze())))
        }
        ACK | MOVING | FIN => {
            if src.len() < COUNT_FRAME {
                return Ok(None);
            }
            src.advance(1);
            let count = src.get_u64();
            Ok(Some(match kind {
                ACK => Frame::Ack(count),
                MOVING => Frame::Moving(count),
                _ => Frame::Fin(count),
            }))
        }
        other => Err(ResumeError::UnknownFrame(other)),
    }
}

fn all_frames(src: &mut BytesMut) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = decode(src).expect("decode") {
        out.push(f);
    }
    out
}

#[test]
fn frames_come_out_as_they_went_in_and_only_once_whole() {
    let mut wire = BytesMut::new();
    put_data(&mut wire, b"hello").unwrap();
    put_ack(&mut wire, 42);
    put_data(&mut wire, &[7u8; MAX_DATA]).unwrap();
    put_moving(&mut wire, u64::MAX);
    put_fin(&mut wire, 5);
    let whole = wire.clone().freeze();

    // Byte by byte: nothing comes out of a partial frame, each frame exactly once.
    let mut src = BytesMut::new();
    let mut got = Vec::new();
    for b in whole.iter() {
        src.put_u8(*b);
        got.extend(all_frames(&mut src));
    }
    assert!(src.is_empty());
    assert_eq!(
        got,
        vec![
            Frame::Data(Bytes::from_static(b"hello")),
            Frame::Ack(42),
            Frame::Data(Bytes::from(vec![7u8; MAX_DATA])),
            Frame::Moving(u64::MAX),
            Frame::Fin(5),
        ]
    );
}

/// Runs `wire` through a [`Decoder`] in chunks of the sizes `cuts` gives (cycled); the control frames,
/// and the DATA payloads merged per frame, in order.
fn streamed(wire: &Bytes, cuts: &[usize]) -> Vec<Frame> {
    let mut decoder = Decoder::default();
    let (mut out, mut data, mut at, mut i) = (Vec::new(), Vec::new(), 0, 0);
    let flush = |data: &mut Vec<u8>, out: &mut Vec<Frame>| {
        if !data.is_empty() {
            out.push(Frame::Data(Bytes::from(std::mem::take(data))));
        }
    };
    while at < wire.len() {
        let n = cuts[i % cuts.len()].min(wire.len() - at);
        i += 1;
        let mut chunk = wire.slice(at..at + n);
        at += n;
        while let Some(piece) = decoder.next(&mut chunk).expect("decode") {
            match piece {
                Piece::Data(b) => data.extend_from_slice(&b),
                Piece::Ack(n) => {
                    flush(&mut data, &mut out);
                    out.push(Frame::Ack(n))
                }
                Piece::Moving(n) => {
                    flush(&mut data, &mut out);
                    out.push(Frame::Moving(n))
                }
                Piece::Fin(n) => {
                    flush(&mut data, &mut out);
                    out.push(Frame::Fin(n))
                }
            }
        }
        assert!(chunk.is_empty());
    }
    flush(&mut data, &mut out);
    assert!(decoder.at_boundary());
    out
}

#[test]
fn the_streaming_decoder_gives_what_whole_frames_give_however_the_stream_is_cut() {
    let mut wire = BytesMut::new();
    put_data(&mut wire, b"hello").unwrap();
    put_ack(&mut wire, 42);
    put_data(&mut wire, &[7u8; 40_000]).unwrap();
    put_moving(&mut wire, u64::MAX);
    put_data(&mut wire, &[9u8; 3]).unwrap();
    put_fin(&mut wire, 5);
    let wire = wire.freeze();
    let whole = all_frames(&mut BytesMut::from(&wire[..]));
    for cuts in [
        &[1][..],
        &[2],
        &[3, 7],
        &[4, 5, 6, 9, 10],
        &[16 * 1024],
        &[wire.len()],
        &[13, 16_384, 1, 2],
    ] {
        assert_eq!(streamed(&wire, cuts), whole, "cut in {cuts:?}");
    }
    // A frame head cut before its end is kept, not lost: not at a boundary until the rest comes.
    let mut decoder = Decoder::default();
    let mut part = wire.slice(..3);
    assert_eq!(decoder.next(&mut part), Ok(None));
    assert!(!decoder.at_boundary());
    // Malformed heads are refused, however they arrive.
    for bad in [&[9u8, 0][..], &[DATA, 0, 0, 0, 0], &[DATA, 0, 4, 0, 1]] {
        let mut d = Decoder::default();
        let mut first = Bytes::copy_from_slice(&bad[..1]);
        let mut rest = Bytes::copy_from_slice(&bad[1..]);
        let got = d.next(&mut first).and_then(|p| match p {
            Some(p) => Ok(Some(p)),
            None => d.next(&mut rest),
        });
        assert!(got.is_err(), "{bad:?}: {got:?}");
    }
}

#[test]
fn malformed_frames_are_refused() {
    let mut unknown = BytesMut::from(&[9u8, 0, 0][..]);
    assert_eq!(decode(&mut unknown), Err(ResumeError::UnknownFrame(9)));

    let mut empty = BytesMut::from(&[DATA, 0, 0, 0, 0][..]);
    assert_eq!(decode(&mut empty), Err(ResumeError::DataLength(0)));

    // Refused from its header alone: a peer cannot make us buffer more than one frame's worth.
    let too_long = (MAX_DATA as u32 + 1).to_be_bytes();
    let mut long = BytesMut::from(&[DATA, too_long[0], too_long[1], too_long[2], too_long[3]][..]);
    assert_eq!(
        decode(&mut long),
        Err(ResumeError::DataLength(MAX_DATA + 1))
    );

    let mut out = BytesMut::new();
    assert_eq!(put_data(&mut out, b""), Err(ResumeError::DataLength(0)));
    assert_eq!(
        put_data(&mut out, &vec![0; MAX_DATA + 1]),
        Err(ResumeError::DataLength(MAX_DATA + 1))
    );
    assert!(out.is_empty());
}

#[test]
fn the_send_log_keeps_unacknowledged_bytes_within_its_window() {
    let mut log = SendLog::new(10);
    log.record(Bytes::from_static(b"abcdef")).unwrap();
    assert_eq!((log.sent(), log.acked(), log.room()), (6, 0, 4));
    // One read may overrun the window; then nothing more until an acknowledgement.
    log.record(Bytes::from_static(b"ghij")).unwrap();
    assert_eq!(log.room(), 0);
    assert_eq!(
        log.record(Bytes::from_static(b"k")),
        Err(ResumeError::WindowFull { len: 1 })
    );
    assert_eq!(
        log.record(Bytes::from(vec![0; MAX_DATA + 1])),
        Err(ResumeError::DataLength(MAX_DATA + 1))
    );
    log.ack(4).unwrap();
    assert_eq!((log.sent(), log.acked(), log.room()), (10, 4, 4));
    log.record(Bytes::from_static(b"k")).unwrap();
    log.resume(5).unwrap();
    assert_eq!(log.unacked_bytes(), b"fghijk");
    assert_eq!(log.acked(), 5);

    assert_eq!(
        log.ack(12),
        Err(ResumeError::AckBeyondSent {
            acked: 12,
            sent: 11
        })
    );
    assert_eq!(
        log.resume(3),
        Err(ResumeError::AckWentBack { before: 5, now: 3 })
    );
    // Refusals leave the log as it was.
    log.resume(5).unwrap();
    assert_eq!(log.unacked_bytes(), b"fghijk");
    log.ack(11).unwrap();
    log.resume(11).unwrap();
    assert!(log.unacked_bytes().is_empty());
}

#[test]
fn the_fin_counts_as_one_unit_and_is_done_only_when_acknowledged() {
    let mut log = SendLog::new(10);
    log.record(Bytes::from_static(b"abc")).unwrap();
    log.finish();
    assert!(log.finished() && !log.done());
    // The bytes acknowledged, not the FIN: it must go again after a move.
    log.resume(3).unwrap();
    assert!(log.unacked_bytes().is_empty());
    assert!(!log.done());
    assert_eq!(
        log.ack(5),
        Err(ResumeError::AckBeyondSent { acked: 5, sent: 4 })
    );
    log.ack(4).unwrap();
    assert!(log.done());
    assert_eq!((log.sent(), log.acked()), (3, 4));
    // Without a FIN, one more than the bytes is beyond what was sent.
    let mut open = SendLog::new(10);
    open.record(Bytes::from_static(b"abc")).unwrap();
    assert_eq!(
        open.ack(4),
        Err(ResumeError::AckBeyondSent { acked: 4, sent: 3 })
    );
}

#[test]
fn the_receiver_acknowledges_every_quarter_window_and_when_quiet() {
    let mut rc = RecvCount::new(100);
    rc.on_data(24);
    assert_eq!(rc.ack_due(), None);
    rc.on_data(1);
    assert_eq!(rc.ack_due(), Some(25));
    assert_eq!(rc.ack_due(), None);
    assert_eq!(rc.ack_idle(), None);
    rc.on_data(3);
    assert_eq!(rc.ack_idle(), Some(28));
    assert_eq!(rc.received(), 28);
}

#[test]
fn resume_header_values_round_trip_and_bad_ones_are_refused() {
    let token = Token::random();
    assert_ne!(token, Token::random());
    let offer = ResumeHeader { token, at: None };
    let value = offer.to_value();
    assert_eq!(value.len(), 32);
    assert_eq!(ResumeHeader::parse(value.as_bytes()), Ok(offer));
    let resume = ResumeHeader {
        token,
        at: Some(u64::MAX),
    };
    let value = resume.to_value();
    assert_eq!(value.to_str().unwrap(), format!("{token};at={}", u64::MAX));
    assert_eq!(ResumeHeader::parse(value.as_bytes()), Ok(resume));

    let hex = "00112233445566778899aabbccddeeff";
    assert!(ResumeHeader::parse(hex.as_bytes()).is_ok());
    assert!(ResumeHeader::parse(hex.to_uppercase().as_bytes()).is_ok());
    for bad in [
        String::new(),
        hex[..31].to_owned(),
        format!("{hex}0"),
        format!("{}g", &hex[..31]),
        format!("{hex};"),
        format!("{hex};at="),
        format!("{hex};at=-1"),
        format!("{hex};at=+1"),
        format!("{hex};at=1 "),
        format!("{hex};from=1"),
        format!("{hex};at=18446744073709551616"),
        format!("+{}", &hex[1..]),
    ] {
        assert_eq!(
            ResumeHeader::parse(bad.as_bytes()),
            Err(ResumeError::BadHeader),
            "{bad:?}"
        );
    }
    assert_eq!(
        ResumeHeader::parse(b"\xff\xfe"),
        Err(ResumeError::BadHeader)
    );
}

/// A small deterministic generator (the test must fail the same way every time it fails).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// One direction of a stream whose receiving end moves (frames in flight lost both ways, a partial
/// frame lost with the old process) many times, at random points; after each move the sender sends
/// again from the receiver's count. What the receiver delivers is the input, exactly.
#[test]
fn bytes_arrive_exactly_once_across_many_moves() {
    for seed in 1..=20u64 {
        let mut rng = Lcg(seed);
        let input: Vec<u8> = (0..600_000).map(|_| rng.below(256) as u8).collect();
        // Small frames and window, so a transfer takes hundreds of rounds and dozens of moves.
        let window = 16 * 1024;
        let mut log = SendLog::new(window);
        let mut to_b = BytesMut::new();
        let mut to_a = BytesMut::new();
        let mut at_b = BytesMut::new();
        let mut at_a = BytesMut::new();
        let mut count = RecvCount::new(window);
        let mut delivered = Vec::with_capacity(input.len());
        let mut moves = 0;

        let mut rounds = 0;
        while delivered.len() < input.len() {
            rounds += 1;
            assert!(rounds < 1_000_000, "seed {seed}: no progress");
            // A sends what its window and the app's bytes allow.
            let next = log.sent() as usize;
            let n = rng
                .below((8 * 1024).min(log.room()).min(input.len() - next) + 1)
                .min(input.len() - next);
            if n > 0 {
                put_data(&mut to_b, &input[next..next + n]).unwrap();
                log.record(Bytes::copy_from_slice(&input[next..next + n]))
                    .unwrap();
            }
            // Some of the wire reaches B.
            let take = rng.below(to_b.len() + 1);
            at_b.extend_from_slice(&to_b.split_to(take));
            while let Some(frame) = decode(&mut at_b).unwrap() {
                let Frame::Data(bytes) = frame else {
                    panic!("A sends only data")
                };
                delivered.extend_from_slice(&bytes);
                count.on_data(bytes.len());
                if let Some(c) = count.ack_due() {
                    put_ack(&mut to_a, c);
                }
            }
            if to_b.is_empty() && at_b.is_empty() {
                if let Some(c) = count.ack_idle() {
                    put_ack(&mut to_a, c);
                }
            }
            // Some acknowledgements reach A.
            let take = rng.below(to_a.len() + 1);
            at_a.extend_from_slice(&to_a.split_to(take));
            while let Some(frame) = decode(&mut at_a).unwrap() {
                let Frame::Ack(c) = frame else {
                    panic!("B sends only acknowledgements")
                };
                log.ack(c).unwrap();
            }
            // Now and then B's process moves: everything on the way is lost, and the partial frames.
            if rng.below(6) == 0 {
                moves += 1;
                to_b.clear();
                to_a.clear();
                at_b.clear();
                at_a.clear();
                log.resume(count.received()).unwrap();
                let again = log.unacked_bytes();
                for chunk in again.chunks(MAX_DATA) {
                    put_data(&mut to_b, chunk).unwrap();
                }
            }
        }
        assert!(moves > 10, "seed {seed}: only {moves} moves");
        assert!(delivered == input, "seed {seed}: delivered bytes differ");
    }
}

#[test]
fn a_restored_log_resends_in_frames_a_data_frame_can_carry_and_acks_across_them() {
    let bytes: Vec<u8> = (0..2 * MAX_DATA + 5).map(|i| (i % 251) as u8).collect();
    let mut log = SendLog::restore(2 * MAX_DATA, 100, &bytes, false, false).unwrap();
    assert_eq!(log.sent(), 100 + bytes.len() as u64);
    let parts: Vec<usize> = log.unacked().map(|p| p.len()).collect();
    assert_eq!(parts, vec![MAX_DATA, MAX_DATA, 5]);
    // An acknowledgement inside the second part.
    log.ack(100 + MAX_DATA as u64 + 7).unwrap();
    assert_eq!(log.unacked_bytes(), &bytes[MAX_DATA + 7..]);
    let parts: Vec<usize> = log.unacked().map(|p| p.len()).collect();
    assert_eq!(parts, vec![MAX_DATA - 7, 5]);
}
