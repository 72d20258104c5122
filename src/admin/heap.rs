//! Heap profiles for `/debug/pprof/heap`: the allocations jemalloc sampled while profiling was active,
//! still live, answered in pprof's protobuf format (`inuse_objects`/count and `inuse_space`/bytes).
//!
//! Input: the process's jemalloc (the `meshnode` binary runs on it, with profiling compiled in and enabled
//! at start but inactive: see `malloc_conf` in `main.rs`); activation through [`set_active`]
//! (`/debug/pprof/heap/profiling?activate=true`, as ztunnel). Output: [`dump`]: jemalloc writes its
//! profile (`prof.dump`) to a private temporary file, which is read back, parsed (jemalloc's `heap_v2` text:
//! a sampling period, then per stack `@ addr…` and its `t*: objects: bytes` line), scaled back from samples
//! to estimated totals as jemalloc's own `jeprof` does, symbolized in process (function, file, line) and
//! encoded. One dump at a time. Only allocations made while active are seen.
//!
//! The jemalloc controls are C calls through `mallctl` (`tikv_jemalloc_ctl::raw`), the only unsafe code
//! here: each names a control of a documented type and passes a value of that type.

use std::collections::HashMap;
use std::ffi::CString;

use prost::Message;

use super::pprof::{Builder, Frame};
use crate::proto::profile as pb;

/// Why there is no heap profile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// jemalloc's profiling was not enabled at start (or this is not jemalloc).
    #[error("heap profiling is not enabled in this process (jemalloc with prof:true at start)")]
    Unavailable,
    /// Profiling is enabled but not active: nothing is being sampled.
    #[error(
        "heap profiling is not active; activate it with /debug/pprof/heap/profiling?activate=true"
    )]
    Inactive,
    /// A jemalloc control failed.
    #[error("jemalloc {control}: {reason}")]
    Control {
        /// The control.
        control: &'static str,
        /// What jemalloc said.
        reason: String,
    },
    /// The dump could not be written, read or parsed.
    #[error("heap profile dump: {0}")]
    Dump(String),
}

static DUMPING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Whether jemalloc's profiling was enabled at start (`opt.prof`).
pub fn available() -> bool {
    tikv_jemalloc_ctl::profiling::prof::read().unwrap_or(false)
}

/// Whether allocations are being sampled now (`prof.active`).
pub fn active() -> Result<bool, Error> {
    if !available() {
        return Err(Error::Unavailable);
    }
    // SAFETY: `prof.active` is a documented `bool` control.
    #[allow(unsafe_code)]
    let on = unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"prof.active\0") };
    on.map_err(|e| Error::Control {
        control: "prof.active",
        reason: e.to_string(),
    })
}

/// Starts or stops sampling allocations (`prof.active`); returns the new setting.
pub fn set_active(on: bool) -> Result<bool, Error> {
    if !available() {
        return Err(Error::Unavailable);
    }
    // SAFETY: `prof.active` is a documented `bool` control; the value is a `bool`.
    #[allow(unsafe_code)]
    let set = unsafe { tikv_jemalloc_ctl::raw::write(b"prof.active\0", on) };
    set.map_err(|e| Error::Control {
        control: "prof.active",
        reason: e.to_string(),
    })?;
    active()
}

/// The live sampled allocations as an encoded pprof profile.
pub fn dump() -> Result<Vec<u8>, Error> {
    if !active()? {
        return Err(Error::Inactive);
    }
    let _one = DUMPING.lock();
    let dir = std::env::temp_dir();
    let path = dir.join(format!("meshnode-heap-{}.prof", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let c_path =
        CString::new(path.to_string_lossy().as_bytes()).map_err(|e| Error::Dump(e.to_string()))?;
    // SAFETY: `prof.dump` takes a `const char *` file name; `c_path` is NUL-terminated and outlives the
    // call, which writes the file before returning.
    #[allow(unsafe_code)]
    let written = unsafe { tikv_jemalloc_ctl::raw::write(b"prof.dump\0", c_path.as_ptr()) };
    written.map_err(|e| Error::Control {
        control: "prof.dump",
        reason: e.to_string(),
    })?;
    let text = std::fs::read_to_string(&path);
    let _ = std::fs::remove_file(&path);
    let text = text.map_err(|e| Error::Dump(format!("reading {}: {e}", path.display())))?;
    let parsed = parse(&text)?;
    Ok(encode(&parsed, symbolize).encode_to_vec())
}

/// One stack of live sampled allocations, scaled to estimated totals.
#[derive(Debug, Clone, PartialEq)]
struct Stack {
    /// Return addresses, innermost first.
    addrs: Vec<u64>,
    objects: i64,
    bytes: i64,
}

#[derive(Debug, Clone, PartialEq)]
struct Parsed {
    /// Average bytes between two samples.
    period: u64,
    stacks: Vec<Stack>,
}

/// Reads jemalloc's `heap_v2` dump. Each sampled stack's counts are scaled by 1 / (1 − e^(−s/p)), s the
/// average allocation size and p the sampling period: an allocation of size s is sampled with probability
/// 1 − e^(−s/p) (jeprof's correction).
fn parse(text: &str) -> Result<Parsed, Error> {
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default();
    let period: u64 = head
        .strip_prefix("heap_v2/")
        .and_then(|p| p.trim().parse().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::Dump(format!("not a heap_v2 profile: {head:?}")))?;
    let mut stacks = Vec::new();
    let mut current: Option<Vec<u64>> = None;
    for line in lines {
        if line.starts_with("MAPPED_LIBRARIES") {
            break;
        }
        if let Some(addrs) = line.strip_prefix("@ ") {
            let addrs = addrs
                .split_whitespace()
                .map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Dump(format!("bad address in {line:?}: {e}")))?;
            current = Some(addrs);
            continue;
        }
        let Some(counts) = line.trim_start().strip_prefix("t*:") else {
            continue;
        };
        // `t*: <objects>: <bytes> [<accumulated objects>: <accumulated bytes>]`
        let mut nums = counts
            .split(|c: char| c == ':' || c == '[' || c.is_whitespace())
            .filter(|s| !s.is_empty());
        let (Some(objects), Some(bytes)) = (nums.next(), nums.next()) else {
            return Err(Error::Dump(format!("bad counts line {line:?}")));
        };
        let (objects, bytes): (f64, f64) = match (objects.parse(), bytes.parse()) {
            (Ok(o), Ok(b)) => (o, b),
            _ => return Err(Error::Dump(format!("bad counts line {line:?}"))),
        };
        // The first `t*` line (before any `@`) is the whole heap's total: not a stack.
        let Some(addrs) = current.take() else {
            continue;
        };
        if objects <= 0.0 {
            continue;
        }
        let scale = 1.0 / (1.0 - (-(bytes / objects) / period as f64).exp());
        stacks.push(Stack {
            addrs,
            objects: (objects * scale).round() as i64,
            bytes: (bytes * scale).round() as i64,
        });
    }
    Ok(Parsed { period, stacks })
}

/// A resolved frame: function name, file, line.
type Resolved = (String, String, i64);

/// The functions at return address `addr` (inlined ones first), resolved in this process.
fn symbolize(addr: u64) -> Vec<Resolved> {
    let mut out = Vec::new();
    // A return address points after the call; the call's own line is one byte before.
    let pc = addr.saturating_sub(1) as usize as *mut std::ffi::c_void;
    backtrace::resolve(pc, |sym| {
        let name = sym
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("{addr:#x}"));
        let file = sym
            .filename()
            .map(|f| f.display().to_string())
            .unwrap_or_default();
        out.push((name, file, i64::from(sym.lineno().unwrap_or(0))));
    });
    if out.is_empty() {
        out.push((format!("{addr:#x}"), String::new(), 0));
    }
    out
}

fn encode(p: &Parsed, resolve: impl Fn(u64) -> Vec<Resolved>) -> pb::Profile {
    let mut b = Builder::new();
    let mut by_address: HashMap<u64, u64> = HashMap::new();
    for stack in &p.stacks {
        let ids = stack
            .addrs
            .iter()
            .map(|&addr| {
                if let Some(&id) = by_address.get(&addr) {
                    return id;
                }
                let frames = resolve(addr);
                let id = b.location(
                    addr,
                    frames.iter().map(|(name, file, line)| Frame {
                        name,
                        system_name: name,
                        file,
                        line: *line,
                    }),
                );
                by_address.insert(addr, id);
                id
            })
            .collect();
        b.sample(ids, vec![stack.objects, stack.bytes], &[]);
    }
    b.finish(
        &[("inuse_objects", "count"), ("inuse_space", "bytes")],
        ("space", "bytes"),
        p.period as i64,
        std::time::SystemTime::now(),
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "heap_v2/524288
  t*: 3: 1572864 [0: 0]
  t0: 3: 1572864 [0: 0]
@ 0x55d0c0001234 0x55d0c0005678 0x7f0000000010
  t*: 2: 1048576 [0: 0]
  t0: 2: 1048576 [0: 0]
@ 0x55d0c0009999 0x55d0c0005678
  t*: 1: 64 [0: 0]
  t0: 1: 64 [0: 0]

MAPPED_LIBRARIES:
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/local/bin/meshnode
";

    #[test]
    fn a_jemalloc_dump_is_read_and_scaled_back_from_its_samples() {
        let p = parse(DUMP).unwrap();
        assert_eq!(p.period, 524_288);
        assert_eq!(p.stacks.len(), 2);
        let big = &p.stacks[0];
        assert_eq!(big.addrs, [0x55d0c0001234, 0x55d0c0005678, 0x7f0000000010]);
        // 512 KiB allocations at a 512 KiB period: each sampled with probability 1 − 1/e.
        let scale = 1.0 / (1.0 - (-1.0f64).exp());
        assert_eq!(big.objects, (2.0 * scale).round() as i64);
        assert_eq!(big.bytes, (1_048_576.0 * scale).round() as i64);
        // A 64-byte allocation is rarely sampled: one sample stands for about 8192 of them.
        let small = &p.stacks[1];
        assert!((8000..8400).contains(&small.objects), "{small:?}");
        assert!(parse("not a profile").is_err());
        assert!(parse("heap_v2/524288\n@ 0xzz\n  t*: 1: 2 [0: 0]\n").is_err());
    }

    #[test]
    fn the_profile_shares_locations_and_functions_and_decodes_as_pprof() {
        let p = parse(DUMP).unwrap();
        let profile = encode(&p, |addr| {
            vec![(format!("f{:x}", addr & 0xffff), "src/x.rs".into(), 7)]
        });
        let bytes = profile.encode_to_vec();
        let back = pb::Profile::decode(bytes.as_slice()).unwrap();
        let s = |i: i64| back.string_table[i as usize].as_str();
        let types: Vec<(&str, &str)> = back
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(
            types,
            [("inuse_objects", "count"), ("inuse_space", "bytes")]
        );
        assert_eq!(back.period, 524_288);
        assert_eq!(back.sample.len(), 2);
        // 0x...5678 appears in both stacks: one location, four in all.
        assert_eq!(back.location.len(), 4);
        assert_eq!(back.sample[0].location_id[1], back.sample[1].location_id[1]);
        assert_eq!(s(back.function[0].name), "f1234");
    }

    #[test]
    fn outside_a_jemalloc_process_with_profiling_the_heap_profile_says_so() {
        // Unit tests run without `malloc_conf`: profiling is not enabled.
        if available() {
            return;
        }
        assert!(matches!(dump(), Err(Error::Unavailable)));
        assert!(matches!(set_active(true), Err(Error::Unavailable)));
    }
}
