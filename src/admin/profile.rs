//! CPU profiles for `/debug/pprof/profile`: the whole process sampled for a while (pprof-rs: a SIGPROF
//! timer and a backtrace per tick), answered in pprof's protobuf format, which `go tool pprof` and every
//! pprof viewer read.
//!
//! Input: how long (`seconds`, 1–300, default 10) and how often (`frequency` in Hz, 1–1000, default 100),
//! as ztunnel takes them. Output: the encoded [`Profile`](crate::proto::profile::Profile): sample types
//! `samples/count` and `cpu/nanoseconds`, one sample per distinct stack (labelled with its thread's name),
//! functions and locations deduplicated. One profile at a time per process (the sampler is process-wide);
//! a second request meanwhile is refused, not queued. Sampling runs on a blocking thread, never on a
//! data-plane worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prost::Message;

use super::pprof::{Builder, Frame};
use crate::proto::profile as pb;

/// Default sampling time.
pub const DEFAULT_SECONDS: u64 = 10;
/// Longest sampling time accepted.
pub const MAX_SECONDS: u64 = 300;
/// Default sampling frequency.
pub const DEFAULT_FREQUENCY: u32 = 100;
/// Highest sampling frequency accepted.
pub const MAX_FREQUENCY: u32 = 1000;

/// Why no profile was taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another profile is being taken.
    #[error("a CPU profile is already being taken; try again when it is done")]
    Busy,
    /// The sampler could not start or report.
    #[error("CPU profiler: {0}")]
    Profiler(String),
}

static RUNNING: AtomicBool = AtomicBool::new(false);

/// Clears [`RUNNING`] when the profile is over, however it ended.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// Samples the process for `duration` at `frequency` Hz and returns the encoded profile.
pub async fn cpu(duration: Duration, frequency: u32) -> Result<Vec<u8>, Error> {
    if RUNNING.swap(true, Ordering::AcqRel) {
        return Err(Error::Busy);
    }
    let running = Running;
    tokio::task::spawn_blocking(move || {
        let _running = running;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(frequency as i32)
            // Unwinding through these from a signal handler can deadlock (pprof-rs's advice).
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| Error::Profiler(e.to_string()))?;
        std::thread::sleep(duration);
        let report = guard
            .report()
            .build()
            .map_err(|e| Error::Profiler(e.to_string()))?;
        Ok(encode(&report).encode_to_vec())
    })
    .await
    .map_err(|e| Error::Profiler(e.to_string()))?
}

/// The report in pprof's format.
fn encode(report: &pprof::Report) -> pb::Profile {
    let mut b = Builder::new();
    let period = 1_000_000_000 / i64::from(report.timing.frequency.max(1));
    for (frames, &count) in &report.data {
        let stack = frames
            .frames
            .iter()
            .map(|symbols| {
                let names: Vec<_> = symbols
                    .iter()
                    .map(|s| {
                        (
                            s.name(),
                            s.sys_name().into_owned(),
                            s.filename().into_owned(),
                            s.lineno(),
                        )
                    })
                    .collect();
                let address = symbols
                    .first()
                    .and_then(|s| s.addr)
                    .map_or(0, |a| a as usize as u64);
                b.location(
                    address,
                    names.iter().map(|(name, system_name, file, line)| Frame {
                        name,
                        system_name,
                        file,
                        line: i64::from(*line),
                    }),
                )
            })
            .collect();
        let count = count as i64;
        b.sample(
            stack,
            vec![count, count * period],
            &[("thread", &frames.thread_name_or_id())],
        );
    }
    b.finish(
        &[("samples", "count"), ("cpu", "nanoseconds")],
        ("cpu", "nanoseconds"),
        period,
        report.timing.start_time,
        report.timing.duration.as_nanos() as i64,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Keeps a core busy in a named function until told to stop.
    fn spin(stop: &AtomicBool) -> u64 {
        let mut x = 0u64;
        while !stop.load(Ordering::Relaxed) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        x
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_profile_decodes_as_pprof_and_names_the_busy_thread_and_one_at_a_time() {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("busy-spinner".into())
                .spawn(move || spin(&stop))
                .unwrap()
        };
        let first = tokio::spawn(cpu(Duration::from_millis(500), 200));
        // Wait until the first has started (the flag is set before its thread starts sampling).
        while !RUNNING.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        let second = cpu(Duration::from_millis(10), 100).await;
        assert!(matches!(second, Err(Error::Busy)), "{second:?}");
        let bytes = first.await.unwrap().unwrap();
        stop.store(true, Ordering::Relaxed);
        busy.join().unwrap();
        let p = pb::Profile::decode(bytes.as_slice()).unwrap();
        assert_eq!(p.string_table[0], "");
        let name = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| (name(t.r#type), name(t.unit)))
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        assert_eq!(p.period, 5_000_000);
        assert!(!p.sample.is_empty());
        // Every reference resolves, and the spinning thread was seen.
        let locations: HashMap<u64, &pb::Location> = p.location.iter().map(|l| (l.id, l)).collect();
        let functions: HashMap<u64, &pb::Function> = p.function.iter().map(|f| (f.id, f)).collect();
        let mut spinner_samples = 0;
        for s in &p.sample {
            assert_eq!(s.value.len(), 2);
            assert_eq!(s.value[1], s.value[0] * p.period);
            for id in &s.location_id {
                for line in &locations[id].line {
                    assert!(functions.contains_key(&line.function_id));
                }
            }
            if s.label
                .iter()
                .any(|l| name(l.key) == "thread" && name(l.str) == "busy-spinner")
            {
                spinner_samples += s.value[0];
            }
        }
        assert!(spinner_samples > 0, "no sample of the busy thread");
        assert!(!RUNNING.load(Ordering::Acquire));
    }
}
