//! The non-blocking log writer: threads that log append their line to a bounded buffer and go on; one
//! thread of its own (`meshnode-log`) writes the buffer out.
//!
//! Input: formatted lines (one `write` per event, as tracing-subscriber's fmt layer hands them over).
//! Output: the same lines, in order, on the output it was given (stdout in production), written in
//! batches: the writer takes everything buffered at once (a swap of two `Vec`s, no allocation once they
//! have grown) and writes it with one `write_all`, as ztunnel's writer coalesces lines into one `writev`.
//!
//! **When the buffer is full, lines are dropped, and counted.** The buffer holds `max_lines` lines
//! (ztunnel's 10 000 by default) and at most [`MAX_BUFFERED_BYTES`]. ztunnel instead makes the logging
//! thread wait for room (back-pressure), so that no access line is ever lost. We choose the other side:
//! the logging threads are the data-plane workers, and a stdout that stops draining (a stuck log shipper,
//! a full container-runtime pipe, a terminal paused with ^S) would otherwise stall every connection on the
//! node behind a diagnostic. Logs are what we give up first; traffic keeps flowing. The loss is never
//! silent: the count is kept ([`Shared::dropped_total`]) and, as soon as the output drains again, the
//! writer reports it through `report` (production: a `warn` line saying how many were lost).
//!
//! A push takes one short lock (a `memcpy` of the line into the buffer; never held across I/O) and wakes
//! the writer. [`Shared::flush`] waits, up to a deadline, until everything pushed before it is written:
//! the process's exit paths call it so the last lines are not lost, and the deadline keeps a stalled
//! stdout from turning an exit into a hang.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use tracing_subscriber::fmt::MakeWriter;

/// Bytes buffered at most, whatever the line count: a few huge debug lines cannot take the process's memory.
pub const MAX_BUFFERED_BYTES: usize = 16 << 20;

/// Capacity the writer's batch keeps between batches; a larger one (after a burst) is given back.
const KEEP_CAPACITY: usize = 256 << 10;

/// Called on the writer thread with the number of lines dropped since the last report.
pub type Report = Box<dyn Fn(u64) + Send>;

/// The buffer shared by the logging threads and the writer thread.
pub struct Shared {
    pending: Mutex<Pending>,
    /// The writer waits here for lines (or for the close).
    ready: Condvar,
    /// Flushers wait here for the writer to finish a batch.
    written: Condvar,
    max_lines: usize,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: usize,
    /// Dropped since the last report.
    dropped: u64,
    /// Dropped since the start.
    dropped_total: u64,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    /// The guard is gone: the writer stops once the buffer is empty.
    closed: bool,
    /// The writer thread has stopped: nothing pushed now will ever be written.
    stopped: bool,
}

impl Shared {
    /// Appends one line, or drops it if the buffer is full. Never blocks on the output.
    pub fn push(&self, line: &[u8]) {
        let mut p = self.pending.lock();
        if p.stopped || p.lines >= self.max_lines || p.bytes.len() + line.len() > MAX_BUFFERED_BYTES
        {
            p.dropped += 1;
            p.dropped_total += 1;
            return;
        }
        p.bytes.extend_from_slice(line);
        p.lines += 1;
        drop(p);
        self.ready.notify_one();
    }

    /// Lines dropped since the start because the buffer was full (or the writer had stopped).
    pub fn dropped_total(&self) -> u64 {
        self.pending.lock().dropped_total
    }

    /// Waits until every line pushed before the call is written, or until `deadline`; true if written.
    pub fn flush(&self, deadline: Instant) -> bool {
        let mut p = self.pending.lock();
        while !p.stopped && (p.writing || !p.bytes.is_empty()) {
            if self.written.wait_until(&mut p, deadline).timed_out() {
                return false;
            }
        }
        p.bytes.is_empty()
    }

    /// Tells the writer to stop once it has written what is buffered.
    pub fn close(&self) {
        self.pending.lock().closed = true;
        self.ready.notify_one();
    }
}

/// Starts the writer thread over `out`, buffering up to `max_lines` lines (at least one).
pub fn start<W: Write + Send + 'static>(
    out: W,
    max_lines: usize,
    report: Report,
) -> io::Result<(Arc<Shared>, std::thread::JoinHandle<()>)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        ready: Condvar::new(),
        written: Condvar::new(),
        max_lines: max_lines.max(1),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("meshnode-log".into())
        .spawn(move || run(&s, out, report))?;
    Ok((shared, thread))
}

fn run<W: Write>(shared: &Shared, mut out: W, report: Report) {
    let mut batch = Vec::new();
    loop {
        let dropped = {
            let mut p = shared.pending.lock();
            while p.bytes.is_empty() && !p.closed {
                shared.ready.wait(&mut p);
            }
            if p.bytes.is_empty() {
                p.stopped = true;
                p.writing = false;
                drop(p);
                shared.written.notify_all();
                return;
            }
            std::mem::swap(&mut p.bytes, &mut batch);
            p.lines = 0;
            p.writing = true;
            std::mem::take(&mut p.dropped)
        };
        // A failed write (stdout closed) loses this batch; there is nowhere else to say so.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch.shrink_to(KEEP_CAPACITY);
        }
        if dropped > 0 {
            // Logged like any other line: it lands in the buffer and goes out with the next batch.
            report(dropped);
        }
        shared.pending.lock().writing = false;
        shared.written.notify_all();
    }
}

/// The fmt layer's writer: each event's line goes to [`Shared::push`].
#[derive(Clone)]
pub struct NonBlocking(pub Arc<Shared>);

/// One event's writer, handed out by [`NonBlocking`].
pub struct LineSink<'a>(&'a Shared);

impl Write for LineSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineSink(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that blocks on each write until the test lets it go, and keeps what it got.
    struct Stalled {
        gate: mpsc::Receiver<()>,
        got: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.gate.recv();
            let _ = self.got.send(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_never_blocks_the_logging_threads_and_the_loss_is_reported() {
        let (open, gate) = mpsc::channel();
        let (got_tx, got) = mpsc::channel();
        let (reported_tx, reported) = mpsc::channel();
        let (shared, thread) = start(
            Stalled { gate, got: got_tx },
            4,
            Box::new(move |n| {
                let _ = reported_tx.send(n);
            }),
        )
        .unwrap();
        // The first line is taken by the writer, which then blocks on the output.
        shared.push(b"first\n");
        while !shared.pending.lock().writing {
            std::thread::yield_now();
        }
        // 4 lines fit in the buffer; 96 more are dropped, and none of these pushes waits.
        for i in 0..100 {
            shared.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(shared.dropped_total(), 96);
        // Output drains: the first batch, then the four buffered lines in one write, then the report.
        open.send(()).unwrap();
        assert_eq!(got.recv().unwrap(), b"first\n");
        open.send(()).unwrap();
        assert_eq!(got.recv().unwrap(), b"line 0\nline 1\nline 2\nline 3\n");
        assert_eq!(reported.recv().unwrap(), 96);
        shared.close();
        thread.join().unwrap();
    }

    #[test]
    fn flush_returns_once_everything_pushed_is_written() {
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Collect(Arc<Mutex<Vec<u8>>>);
        impl Write for Collect {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (shared, thread) = start(Collect(out.clone()), 10_000, Box::new(|_| {})).unwrap();
        for i in 0..1000 {
            shared.push(format!("{i}\n").as_bytes());
        }
        assert!(shared.flush(Instant::now() + std::time::Duration::from_secs(3600)));
        assert_eq!(out.lock().iter().filter(|b| **b == b'\n').count(), 1000);
        shared.close();
        thread.join().unwrap();
        assert_eq!(shared.dropped_total(), 0);
    }
}
