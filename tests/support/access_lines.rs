//! Access lines captured in-process: the proxies of a `#[tokio::test]` log to a buffer the test reads.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;

use meshnode::logging::Format;

/// The access lines (target `access`, ztunnel's text shape) written on this thread while the guard
/// lives: `#[tokio::test]` runs every task of the test on it.
#[derive(Clone, Default)]
pub struct AccessLines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for AccessLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AccessLines {
    pub fn capture() -> (AccessLines, tracing::subscriber::DefaultGuard) {
        let lines = AccessLines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry()
            .with(Targets::new().with_target("access", Level::INFO))
            .with(meshnode::logging::layer(Format::Text, move || {
                writer.clone()
            }));
        (lines, tracing::subscriber::set_default(subscriber))
    }

    /// Waits up to 5 s for a line holding every one of `needles`, and returns it.
    pub async fn line_with(&self, needles: &[&str]) -> String {
        for _ in 0..50 {
            let text = String::from_utf8_lossy(&self.0.lock()).into_owned();
            if let Some(l) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.to_string();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no access line with {needles:?}; the lines are:\n{}",
            String::from_utf8_lossy(&self.0.lock())
        );
    }
}
