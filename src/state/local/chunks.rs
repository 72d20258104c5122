//! Parsing a large local config in pieces, on several threads.
//!
//! A file describing a whole cluster holds tens of thousands of workloads, and parsing it is nearly all of
//! the proxy's time to ready. The YAML library reads a document into one list of events before building
//! anything, so a 15 MB file also costs a quarter of a gigabyte at its peak. This module cuts such a
//! file into its top-level sections (`workloads:`, `services:`, `policies:`) and their lists into runs of
//! whole items, each of them valid YAML on its own, to be parsed on scoped threads.
//!
//! Input: the file's text. Output: its [`Piece`]s in file order, or `None` when the text is not of the
//! plain shape the cut relies on (the caller then parses it whole); [`run_all`] to work through them on
//! scoped threads. The cut is made only at lines that can do nothing but start a new top-level key or a
//! new list item: a key at column 0, or `- ` at the list's own indentation. A piece that still does not
//! parse on its own (a quoted or bracketed value spanning lines, an alias to an anchor in another piece)
//! must send the caller back to the whole parse, which gives the true result and errors with their real
//! line numbers.

/// When a file is worth cutting.
#[derive(Clone, Copy)]
pub(super) struct Limits {
    /// Threads to parse on, the calling one included.
    pub threads: usize,
    /// Files smaller than this are parsed whole: the threads would cost more than they save.
    pub min_bytes: usize,
    /// Items per piece. Small pieces keep each parse's event list small enough to be reused from the
    /// allocator's cache instead of faulting in fresh pages (measured on 50 000 workloads: 512 items a
    /// piece loaded in 300 ms with a 114 MB peak, one piece per thread in 440 ms with 147 MB).
    pub piece_items: usize,
}

impl Limits {
    /// For this machine: as many threads as it has cores for this process (at most 8), files from
    /// 256 KiB, pieces of 512 items.
    pub(super) fn here() -> Limits {
        Limits {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            min_bytes: 256 * 1024,
            piece_items: 512,
        }
    }

    /// Every list cut into pieces of two items on three threads, whatever the file's size: for tests and
    /// the fuzz target, which compare the result with the whole load.
    pub(super) fn tiny() -> Limits {
        Limits {
            threads: 3,
            min_bytes: 0,
            piece_items: 2,
        }
    }
}

/// A run of text that parses on its own.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece<'a> {
    /// What it holds.
    pub kind: Kind,
    /// The text: a YAML list of `kind` items, or (for [`Kind::Whole`]) a file with one top-level key.
    pub text: &'a str,
}

/// What a [`Piece`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Workload items.
    Workloads,
    /// Service items.
    Services,
    /// Policy items.
    Policies,
    /// A file of its own with one top-level key (`policies: []`, a short or empty list).
    Whole,
}

impl Kind {
    fn of(key: &str) -> Option<Kind> {
        match key {
            "workloads" => Some(Kind::Workloads),
            "services" => Some(Kind::Services),
            "policies" => Some(Kind::Policies),
            _ => None,
        }
    }
}

/// Cuts `text` into pieces, in file order; `None` when it should be parsed whole instead (small, or not
/// of the plain shape).
pub(super) fn pieces(text: &str, limits: Limits) -> Option<Vec<Piece<'_>>> {
    if text.len() < limits.min_bytes {
        return None;
    }
    split(text, limits)
}

/// Runs `f` over `jobs` on up to `threads` scoped threads (the calling one included), each with its own
/// context from `init`, taking jobs in turn; the results in the jobs' order, or `None` if any gave
/// `None` (the others then stop early).
pub(super) fn run_all<J: Sync, C, R: Send>(
    jobs: &[J],
    threads: usize,
    init: impl Fn() -> C + Sync,
    f: impl Fn(&mut C, &J) -> Option<R> + Sync,
) -> Option<Vec<R>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let work = || {
        let mut cx = init();
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= jobs.len() || failed.load(Ordering::Relaxed) {
                return done;
            }
            match f(&mut cx, &jobs[i]) {
                Some(r) => done.push((i, r)),
                None => failed.store(true, Ordering::Relaxed),
            }
        }
    };
    let mut all = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads.min(jobs.len()))
            .map(|_| s.spawn(work))
            .collect();
        let mut all = work();
        for h in helpers {
            // A panic in a helper is a panic in the parser: re-raise it here, as a whole parse would.
            all.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        all
    });
    if failed.load(Ordering::Relaxed) || all.len() != jobs.len() {
        return None;
    }
    all.sort_unstable_by_key(|(i, _)| *i);
    Some(all.into_iter().map(|(_, r)| r).collect())
}

/// Cuts `text` into sections and runs; `None` when it is not of the plain shape: only blank lines,
/// comments and the three known keys at column 0 (each at most once), each list's items at one
/// indentation, nothing less indented than the items inside a list.
fn split(text: &str, limits: Limits) -> Option<Vec<Piece<'_>>> {
    // (key, start of the key line, start of its body) for each top-level key, in order.
    let mut keys: Vec<(Kind, usize, usize)> = Vec::new();
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        let l = line.trim_end_matches(['\n', '\r']);
        match l.as_bytes().first() {
            None | Some(b' ') | Some(b'#') => continue,
            Some(b'-') if !keys.is_empty() => continue,
            _ => {}
        }
        let (key, rest) = l.split_once(':')?;
        // The three keys of the format, each once (anything else is refused by the whole parse).
        let key = Kind::of(key)?;
        if keys.iter().any(|(k, _, _)| *k == key) {
            return None;
        }
        let rest = rest.trim_start_matches([' ', '\t']);
        if !(rest.is_empty() || rest.starts_with('#')) {
            // An inline value (`policies: []`): the section is parsed whole.
            keys.push((key, start, start));
            continue;
        }
        keys.push((key, start, pos));
    }
    if keys.is_empty() || text[..keys[0].1].lines().any(|l| !blank_or_comment(l)) {
        return None;
    }
    let mut pieces = Vec::new();
    for (n, &(kind, start, body)) in keys.iter().enumerate() {
        let end = keys.get(n + 1).map_or(text.len(), |k| k.1);
        let whole = Piece {
            kind: Kind::Whole,
            text: &text[start..end],
        };
        if body == start {
            pieces.push(whole);
            continue;
        }
        match items(&text[body..end], limits)? {
            Some(runs) => pieces.extend(runs.into_iter().map(|text| Piece { kind, text })),
            None => pieces.push(whole),
        }
    }
    Some(pieces)
}

/// Cuts a list's body into runs of `piece_items` whole items (the last one may be shorter); `Some(None)`
/// when the body is empty or short (parse it whole), `None` when it is not a plain list.
fn items(body: &str, limits: Limits) -> Option<Option<Vec<&str>>> {
    // Where each item starts, and the items' indentation (that of the first).
    let mut starts = Vec::new();
    let mut indent = None;
    let mut pos = 0;
    for line in body.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        let l = line.trim_end_matches(['\n', '\r']);
        if blank_or_comment(l) {
            continue;
        }
        let depth = l.len() - l.trim_start_matches(' ').len();
        let at = *indent.get_or_insert(depth);
        if depth < at {
            return None;
        }
        if depth == at {
            let item = &l[depth..];
            if !(item == "-" || item.starts_with("- ")) {
                return None;
            }
            starts.push(start);
        }
    }
    let per_run = limits.piece_items.max(1);
    if starts.len() < 2 * per_run {
        return Some(None);
    }
    let mut runs = Vec::with_capacity(starts.len() / per_run + 1);
    let mut cut = 0;
    for chunk in starts.chunks(per_run).skip(1) {
        runs.push(&body[cut..chunk[0]]);
        cut = chunk[0];
    }
    runs.push(&body[cut..]);
    Some(Some(runs))
}

fn blank_or_comment(line: &str) -> bool {
    let t = line.trim_start_matches([' ', '\t', '\r']);
    t.is_empty() || t.starts_with('#')
}

#[cfg(test)]
mod tests;
