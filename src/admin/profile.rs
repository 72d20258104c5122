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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use prost::Message;

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

/// Strings by index, index 0 the empty string, as the format wants.
#[derive(Default)]
struct Strings {
    index: HashMap<String, i64>,
    table: Vec<String>,
}

impl Strings {
    fn new() -> Strings {
        let mut s = Strings::default();
        s.id("");
        s
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// The report in pprof's format.
fn encode(report: &pprof::Report) -> pb::Profile {
    let mut strings = Strings::new();
    let mut functions: HashMap<(i64, i64, i64), u64> = HashMap::new();
    let mut function_list = Vec::new();
    let mut locations: HashMap<Vec<(u64, i64)>, u64> = HashMap::new();
    let mut location_list = Vec::new();
    let period = 1_000_000_000 / i64::from(report.timing.frequency.max(1));
    let thread = strings.id("thread");
    let mut samples = Vec::with_capacity(report.data.len());
    for (frames, &count) in &report.data {
        let mut location_ids = Vec::with_capacity(frames.frames.len());
        for symbols in &frames.frames {
            let lines: Vec<(u64, i64)> = symbols
                .iter()
                .map(|s| {
                    let key = (
                        strings.id(&s.name()),
                        strings.id(&s.sys_name()),
                        strings.id(&s.filename()),
                    );
                    let next = function_list.len() as u64 + 1;
                    let id = *functions.entry(key).or_insert_with(|| {
                        function_list.push(pb::Function {
                            id: next,
                            name: key.0,
                            system_name: key.1,
                            filename: key.2,
                        });
                        next
                    });
                    (id, i64::from(s.lineno()))
                })
                .collect();
            let address = symbols
                .first()
                .and_then(|s| s.addr)
                .map_or(0, |a| a as usize as u64);
            let next = location_list.len() as u64 + 1;
            let id = *locations.entry(lines.clone()).or_insert_with(|| {
                location_list.push(pb::Location {
                    id: next,
                    address,
                    line: lines
                        .iter()
                        .map(|&(function_id, line)| pb::Line { function_id, line })
                        .collect(),
                });
                next
            });
            location_ids.push(id);
        }
        let count = count as i64;
        samples.push(pb::Sample {
            location_id: location_ids,
            value: vec![count, count * period],
            label: vec![pb::Label {
                key: thread,
                str: strings.id(&frames.thread_name_or_id()),
            }],
        });
    }
    let value_type = |strings: &mut Strings, t: &str, u: &str| pb::ValueType {
        r#type: strings.id(t),
        unit: strings.id(u),
    };
    let sample_type = vec![
        value_type(&mut strings, "samples", "count"),
        value_type(&mut strings, "cpu", "nanoseconds"),
    ];
    let period_type = Some(value_type(&mut strings, "cpu", "nanoseconds"));
    pb::Profile {
        sample_type,
        sample: samples,
        location: location_list,
        function: function_list,
        time_nanos: report
            .timing
            .start_time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        duration_nanos: report.timing.duration.as_nanos() as i64,
        period_type,
        period,
        string_table: strings.table,
    }
}

#[cfg(test)]
mod tests {
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
