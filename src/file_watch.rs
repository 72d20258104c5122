//! Config files: polling one and publishing each good version (the one reload rule every file-driven part
//! of meshnode follows: the proxy's local config, the agent's enrollment file, the control plane's mesh
//! file), and writing one atomically and durably (the agent's state and hint files, the control plane's
//! root, installed CNI files); durably means `fsync`ed, except where the directory lives in memory (tmpfs,
//! ramfs: `/var/run` in a cluster), where nothing survives a power loss anyway.
//!
//! Input: a path, a poll interval, what was already loaded ([`Seen`]: its length and SHA-256, not the bytes,
//! so a 15 MB config is not held twice), a parser. Output: a new value on the `watch` channel whenever the
//! file's bytes change and parse; an unreadable file, one larger than [`MAX_FILE_BYTES`], or a bad edit is
//! logged and the last good value keeps serving. Returns when every receiver is gone. Each poll is one
//! `stat`: the file is read only when its inode, size, mtime or ctime moved (an atomic rename, a Kubernetes
//! ConfigMap's symlink swap and an in-place write all move one of them).

use std::fmt::Display;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// Largest config file read: far above any real mesh, low enough that a runaway file cannot exhaust memory.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Reads `path` up to [`MAX_FILE_BYTES`]; a larger file is an error.
async fn read_bounded(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .await?;
    within_limit(bytes)
}

/// [`read_bounded`] for the first, synchronous load of a file that is then polled: the same limit, so a
/// file refused on reload is refused at start too. Also returns what the poller needs to know of it,
/// stamped before the read, so that the first poll only reads the file again if it changed meanwhile (a
/// 15 MB config is not read, hashed and freed a second time just after start).
pub fn read_bounded_sync(path: &std::path::Path) -> std::io::Result<(Vec<u8>, Seen)> {
    use std::io::Read;
    let stamp = std::fs::metadata(path).ok().map(|m| Stamp::of(&m));
    let file = std::fs::File::open(path)?;
    // Sized from the file's length (within the limit) up front: a large file is read without regrowing.
    let len = file
        .metadata()
        .map_or(0, |m| m.len())
        .min(MAX_FILE_BYTES + 1);
    let mut bytes = Vec::with_capacity(len as usize + 1);
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    let bytes = within_limit(bytes)?;
    let seen = Seen {
        stamp,
        ..Seen::of(&bytes)
    };
    Ok((bytes, seen))
}

fn within_limit(bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically and durably: readers (and pollers) never see half a file, and once
/// this returns `Ok` a power loss keeps the new contents (on a filesystem that keeps anything across one).
/// See [`write_atomically_mode`].
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_mode(path, bytes, None)
}

/// [`write_atomically`], the file getting `mode` (e.g. 0o755 for a binary, 0o600 for a secret) before it
/// takes the name; without a mode it is created 0o666 less the umask.
///
/// Steps: a new temporary file next to `path` (a name of its own per call, so concurrent writers never
/// share one; created with the mode, so a secret is never readable by others), the bytes, `fsync`, rename
/// over `path`, `fsync` of the directory so the rename itself survives a power loss. Both `fsync`s are
/// skipped when the directory is on tmpfs or ramfs ([`in_memory_fs`], asked once per call). On failure the
/// temporary file is removed; only a crash part way leaves one behind (`.<name>.<pid>.<n>.tmp`).
pub fn write_atomically_mode(
    path: &std::path::Path,
    bytes: &[u8],
    mode: Option<u32>,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);

    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let durable = !in_memory_fs(dir);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode.unwrap_or(0o666))
            .open(&tmp)?;
        if let Some(mode) = mode {
            // The umask narrowed the mode at open; this sets exactly what was asked.
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if durable {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `RAMFS_MAGIC` from `<linux/magic.h>` (neither `libc` nor `nix` names it).
const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6_u32 as _);

/// Whether files in `dir` live only in memory (tmpfs, ramfs), so `fsync` there has nothing to make
/// durable. A directory whose filesystem cannot be asked counts as on disk.
pub fn in_memory_fs(dir: &std::path::Path) -> bool {
    use nix::sys::statfs::{statfs, TMPFS_MAGIC};
    statfs(dir).is_ok_and(|fs| {
        let kind = fs.filesystem_type();
        kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
    })
}

/// What a poller remembers of the content it last handled: length and SHA-256, and the file's [`Stamp`]
/// when it was read (none when unknown: the first poll then reads the file again).
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    len: usize,
    digest: [u8; 32],
    stamp: Option<Stamp>,
}

impl Seen {
    /// The fingerprint of `bytes`, with no stamp.
    pub fn of(bytes: &[u8]) -> Seen {
        let mut digest = [0; 32];
        digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        Seen {
            len: bytes.len(),
            digest,
            stamp: None,
        }
    }

    fn same_content(&self, other: &Seen) -> bool {
        self.len == other.len && self.digest == other.digest
    }
}

/// What `stat` says of a file: when none of it moved, the content has not changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

async fn stamp(path: &std::path::Path) -> Option<Stamp> {
    Some(Stamp::of(&tokio::fs::metadata(path).await.ok()?))
}

/// Polls `path` every `interval`; `parse` turns new bytes into a value, `loaded` logs a published one.
pub async fn poll<T, E: Display>(
    path: PathBuf,
    interval: Duration,
    mut last: Seen,
    tx: watch::Sender<Arc<T>>,
    parse: impl Fn(&[u8]) -> Result<T, E>,
    loaded: impl Fn(&T),
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // As the caller's first read found it (stamped before reading: a change during that read makes the
    // first poll read again); unknown when the caller had no stamp, and then the first poll reads again.
    let mut stamped: Option<Stamp> = last.stamp;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tx.closed() => return,
        }
        // Taken before reading: a change during the read moves the stamp, so the next poll reads again.
        let now = stamp(&path).await;
        if now.is_some() && now == stamped {
            continue;
        }
        stamped = now;
        let bytes = match read_bounded(&path).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read config file; keeping the last good version");
                continue;
            }
        };
        let seen = Seen::of(&bytes);
        if seen.same_content(&last) {
            continue;
        }
        match parse(&bytes) {
            Ok(value) => {
                loaded(&value);
                tx.send_replace(Arc::new(value));
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "config file change refused; keeping the last good version")
            }
        }
        last = seen;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn good_edits_are_published_and_bad_ones_keep_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(1u32));
        tokio::spawn(poll(
            path.clone(),
            Duration::from_millis(10),
            Seen::of(b"1"),
            tx,
            |b: &[u8]| String::from_utf8_lossy(b).trim().parse::<u32>(),
            |_| {},
        ));
        std::fs::write(&path, "2").unwrap();
        rx.changed().await.unwrap();
        assert_eq!(**rx.borrow(), 2);
        std::fs::write(&path, "not a number").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(**rx.borrow(), 2);
        std::fs::write(&path, "3").unwrap();
        rx.changed().await.unwrap();
        assert_eq!(**rx.borrow_and_update(), 3);
    }

    #[tokio::test]
    async fn a_change_right_after_the_first_load_is_picked_up_and_an_unchanged_file_is_not_reparsed(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").unwrap();
        let (bytes, seen) = read_bounded_sync(&path).unwrap();
        assert_eq!(bytes, b"1");
        let parsed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, mut rx) = watch::channel(Arc::new(1u32));
        let count = parsed.clone();
        tokio::spawn(poll(
            path.clone(),
            Duration::from_millis(10),
            seen,
            tx,
            move |b: &[u8]| {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                String::from_utf8_lossy(b).trim().parse::<u32>()
            },
            |_| {},
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(parsed.load(std::sync::atomic::Ordering::Relaxed), 0);
        std::fs::write(&path, "22").unwrap();
        rx.changed().await.unwrap();
        assert_eq!(**rx.borrow(), 22);
        assert_eq!(parsed.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_oversized_file_is_not_read_and_the_last_good_value_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, "x").unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(1usize));
        tokio::spawn(poll(
            path.clone(),
            Duration::from_millis(10),
            Seen::of(b"x"),
            tx,
            |b: &[u8]| Ok::<usize, String>(b.len()),
            |_| {},
        ));
        // Written aside and renamed in, so the poller never sees it half-written.
        let big = dir.path().join("big.tmp");
        std::fs::write(&big, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        std::fs::rename(&big, &path).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(**rx.borrow(), 1);
        std::fs::write(&path, "abc").unwrap();
        // (A poll that overlaps the rewrite may first see a truncated read; the next one sees "abc".)
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| **v == 3))
            .await
            .expect("the small file is published")
            .unwrap();
    }

    /// Whether any extent of `path` is still only in memory (FIEMAP flags it delayed-allocation or
    /// unknown-location until writeback): `None` where the filesystem cannot tell (tmpfs, ...).
    #[allow(unsafe_code)]
    fn data_only_in_memory(path: &std::path::Path) -> Option<bool> {
        use std::os::fd::AsRawFd;
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
        const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
        const EXTENTS: usize = 32;
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Extent {
            logical: u64,
            physical: u64,
            length: u64,
            reserved64: [u64; 2],
            flags: u32,
            reserved: [u32; 3],
        }
        #[repr(C)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped_extents: u32,
            extent_count: u32,
            reserved: u32,
            extents: [Extent; EXTENTS],
        }
        let file = std::fs::File::open(path).unwrap();
        let mut map = Fiemap {
            start: 0,
            length: u64::MAX,
            flags: 0, // not FIEMAP_FLAG_SYNC: that would write the data back first
            mapped_extents: 0,
            extent_count: EXTENTS as u32,
            reserved: 0,
            extents: [Extent {
                logical: 0,
                physical: 0,
                length: 0,
                reserved64: [0; 2],
                flags: 0,
                reserved: [0; 3],
            }; EXTENTS],
        };
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most `extent_count` extents into `map`,
        // which has room for them; `file` is open for the whole call.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map) } != 0 {
            return None;
        }
        let mapped = (map.mapped_extents as usize).min(EXTENTS);
        Some(
            map.extents[..mapped]
                .iter()
                .any(|e| e.flags & (FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN) != 0),
        )
    }

    #[test]
    fn a_written_file_is_on_disk_when_write_atomically_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pods.json");
        // Large enough not to be stored inline in the inode.
        let bytes = vec![b'p'; 256 * 1024];
        std::fs::write(dir.path().join("probe"), &bytes).unwrap();
        let observable = crate::test_gate::needs(
            "a_written_file_is_on_disk_when_write_atomically_returns (its durability part)",
            data_only_in_memory(&dir.path().join("probe")) == Some(true),
            "the temp directory's filesystem does not report unwritten data (FIEMAP)",
        );
        write_atomically(&path, &bytes).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        if observable {
            assert_eq!(
                data_only_in_memory(&path),
                Some(false),
                "the data is still only in the page cache: a power loss would lose it"
            );
        }
        write_atomically_mode(&path, b"secret", Some(0o600)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "no temporary file left: {left:?}");
    }

    /// The filesystem type `stat -f` (coreutils) reports for `path`: an outside opinion to check against.
    fn stat_fs_type(path: &std::path::Path) -> String {
        let out = std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(path)
            .output()
            .expect("stat runs");
        assert!(out.status.success(), "stat -f {}", path.display());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn files_count_as_in_memory_exactly_where_stat_reports_tmpfs_or_ramfs() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [
            std::path::Path::new("/dev/shm"),
            std::path::Path::new("/"),
            dir.path(),
        ];
        for path in paths {
            let kind = stat_fs_type(path);
            assert_eq!(
                in_memory_fs(path),
                kind == "tmpfs" || kind == "ramfs",
                "{} is {kind}",
                path.display()
            );
        }
        assert!(
            !in_memory_fs(&dir.path().join("missing")),
            "unknown counts as on disk"
        );
        // Both answers must have been seen for the comparison above to mean something.
        let shm_is_tmpfs = stat_fs_type(std::path::Path::new("/dev/shm")) == "tmpfs";
        let disk_seen = paths
            .iter()
            .any(|p| !matches!(stat_fs_type(p).as_str(), "tmpfs" | "ramfs"));
        if crate::test_gate::needs(
            "files_count_as_in_memory_exactly_where_stat_reports_tmpfs_or_ramfs",
            shm_is_tmpfs && disk_seen,
            "needs /dev/shm on tmpfs and / or the temp directory on disk",
        ) {
            assert!(in_memory_fs(std::path::Path::new("/dev/shm")));
        }
    }

    /// ramfs has no place of its own on this machine: mounted in a private mount namespace, on a thread
    /// of its own (mount namespaces are per thread once `unshare`d), next to a tmpfs for comparison.
    #[test]
    fn a_ramfs_or_tmpfs_mount_counts_as_in_memory_and_writes_still_land() {
        crate::needs_root!("a_ramfs_or_tmpfs_mount_counts_as_in_memory_and_writes_still_land");
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        std::thread::spawn(move || {
            use nix::mount::{mount, MsFlags};
            use nix::sched::{unshare, CloneFlags};
            unshare(CloneFlags::CLONE_NEWNS).expect("unshare the mount namespace");
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                None::<&str>,
            )
            .expect("make mounts private");
            assert!(!in_memory_fs(&base), "{} is on disk", base.display());
            for fs in ["ramfs", "tmpfs"] {
                let at = base.join(fs);
                std::fs::create_dir(&at).unwrap();
                mount(Some(fs), &at, Some(fs), MsFlags::empty(), None::<&str>)
                    .unwrap_or_else(|e| panic!("mount {fs}: {e}"));
                assert!(in_memory_fs(&at), "{fs}");
                write_atomically(&at.join("pods.json"), b"{}").unwrap();
                assert_eq!(std::fs::read(at.join("pods.json")).unwrap(), b"{}");
                nix::mount::umount(&at).unwrap();
            }
        })
        .join()
        .expect("the mount-namespace thread");
    }

    #[test]
    fn concurrent_writers_of_one_file_never_fail_or_leave_half_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hint.json");
        let writers: Vec<_> = [b'a', b'b']
            .into_iter()
            .map(|fill| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let bytes = vec![fill; 64 * 1024];
                    for _ in 0..50 {
                        write_atomically(&path, &bytes)?;
                        let seen = std::fs::read(&path)?;
                        assert!(
                            seen.len() == bytes.len()
                                && (seen.iter().all(|b| *b == b'a')
                                    || seen.iter().all(|b| *b == b'b')),
                            "half a file seen ({} bytes)",
                            seen.len()
                        );
                    }
                    std::io::Result::Ok(())
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap().expect("every write succeeds");
        }
    }

    #[test]
    fn the_first_load_refuses_an_oversized_file_like_the_poller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let err = read_bounded_sync(&path).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        std::fs::write(&path, "ok").unwrap();
        assert_eq!(read_bounded_sync(&path).unwrap().0, b"ok");
        // And through the loaders that use it.
        std::fs::write(&path, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let agent = crate::cni_agent::local::load(&path).unwrap_err();
        assert!(agent.to_string().contains("larger than"), "{agent}");
        let proxy = crate::state::local::load_file(&path).unwrap_err();
        assert!(proxy.to_string().contains("larger than"), "{proxy}");
    }
}
