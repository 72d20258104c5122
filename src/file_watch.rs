//! Config files: polling one and publishing each good version (the one reload rule every file-driven part
//! of meshnode follows: the proxy's local config, the agent's enrollment file, the control plane's mesh
//! file), and writing one atomically (the agent's state and hint files, the control plane's root).
//!
//! Input: a path, a poll interval, the bytes already loaded, a parser. Output: a new value on the `watch`
//! channel whenever the file's bytes change and parse; an unreadable file, one larger than
//! [`MAX_FILE_BYTES`], or a bad edit is logged and the last good value keeps serving. Returns when every
//! receiver is gone.

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
/// file refused on reload is refused at start too.
pub fn read_bounded_sync(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    within_limit(bytes)
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

/// Writes `bytes` to `path` through a temporary file and a rename, so readers (and pollers) never see half
/// a file.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_mode(path, bytes, None)
}

/// [`write_atomically`], the file getting `mode` (e.g. 0o755 for a binary) before it takes the name.
pub fn write_atomically_mode(
    path: &std::path::Path,
    bytes: &[u8],
    mode: Option<u32>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::rename(&tmp, path)
}

/// Polls `path` every `interval`; `parse` turns new bytes into a value, `loaded` logs a published one.
pub async fn poll<T, E: Display>(
    path: PathBuf,
    interval: Duration,
    mut last: Vec<u8>,
    tx: watch::Sender<Arc<T>>,
    parse: impl Fn(&[u8]) -> Result<T, E>,
    loaded: impl Fn(&T),
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tx.closed() => return,
        }
        let bytes = match read_bounded(&path).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read config file; keeping the last good version");
                continue;
            }
        };
        if bytes == last {
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
        last = bytes;
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
            b"1".to_vec(),
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
    async fn an_oversized_file_is_not_read_and_the_last_good_value_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, "x").unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(1usize));
        tokio::spawn(poll(
            path.clone(),
            Duration::from_millis(10),
            b"x".to_vec(),
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

    #[test]
    fn the_first_load_refuses_an_oversized_file_like_the_poller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let err = read_bounded_sync(&path).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        std::fs::write(&path, "ok").unwrap();
        assert_eq!(read_bounded_sync(&path).unwrap(), b"ok");
        // And through the loaders that use it.
        std::fs::write(&path, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let agent = crate::cni_agent::local::load(&path).unwrap_err();
        assert!(agent.to_string().contains("larger than"), "{agent}");
        let proxy = crate::state::local::load_file(&path).unwrap_err();
        assert!(proxy.to_string().contains("larger than"), "{proxy}");
    }
}
