//! `CertManager`: one current certificate per identity, fetched on first use and rotated.
//!
//! Input: a [`CertSource`] and the identities the proxy asks for. Output: per identity, a
//! `watch::Receiver<Arc<WorkloadCert>>` that always holds a usable certificate.
//!
//! The first `get` for an identity fetches (concurrent callers share that single fetch). A
//! background task then re-fetches at [`WorkloadCert::refresh_at`] (half-life) and publishes the
//! result. If a fetch fails the old certificate stays published and the task retries with
//! exponential backoff (500 ms, x2, ±20 % jitter, at most 150 s), never sleeping past the old
//! certificate's expiry. `forget` (or dropping the manager) stops the task and closes the channel.
//! Time: sleeps use `tokio::time`; certificate times are compared with the wall clock
//! (`SystemTime::now()`), re-read before every sleep so clock corrections are followed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::{watch, OnceCell};
use tokio::task::AbortHandle;

use super::{CertSource, Error, Identity, WorkloadCert};

/// Refresh and retry timing. `PRODUCTION` holds the real values; tests shrink them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    /// First retry delay after a failed refresh.
    pub(crate) initial_backoff: Duration,
    /// Longest retry delay.
    pub(crate) max_backoff: Duration,
    /// Shortest wait before refreshing a freshly fetched certificate, so a source that hands out
    /// (nearly) expired certificates cannot make the task spin.
    pub(crate) min_refresh_delay: Duration,
}

impl Timing {
    pub(crate) const PRODUCTION: Self = Self {
        // Quick first retry: most CA hiccups are a dropped connection or a restart.
        initial_backoff: Duration::from_millis(500),
        // A CA outage is noticed within a few minutes of it ending.
        max_backoff: Duration::from_secs(150),
        // Same as the first retry: a broken source is polled no faster than a failing one.
        min_refresh_delay: Duration::from_millis(500),
    };
}

/// Each retry delay is scaled by a random factor in `1 ± JITTER` so nodes do not retry in step.
const JITTER: f64 = 0.2;

/// Keeps a fresh certificate for each identity in use.
pub struct CertManager {
    source: Arc<dyn CertSource>,
    timing: Timing,
    /// One slot per identity asked for. Locked only to look up or change the map, never across
    /// an `.await`. Holds only identities of local workloads; `forget` removes them.
    slots: Mutex<HashMap<Identity, Arc<Slot>>>,
}

/// The state for one identity: empty until the first fetch succeeds.
#[derive(Default)]
struct Slot {
    rotation: OnceCell<Rotation>,
}

/// A published certificate and the task that keeps it fresh. Dropping it stops the task.
struct Rotation {
    cert: watch::Sender<Arc<WorkloadCert>>,
    task: AbortHandle,
}

impl Drop for Rotation {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CertManager {
    /// A manager fetching from `source`.
    pub fn new(source: Arc<dyn CertSource>) -> Arc<Self> {
        Self::with_timing(source, Timing::PRODUCTION)
    }

    /// A manager with other refresh/retry timing (tests).
    pub(crate) fn with_timing(source: Arc<dyn CertSource>, timing: Timing) -> Arc<Self> {
        Arc::new(Self {
            source,
            timing,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate channel for `id`.
    ///
    /// The first call for an identity fetches (callers wait; concurrent callers share the one
    /// fetch; if it fails each waiting caller in turn tries again); later calls return a receiver
    /// of the same channel. A background task (`tokio::spawn`) re-fetches at
    /// [`WorkloadCert::refresh_at`] and publishes the new certificate; on failure it retries with
    /// exponential backoff (500 ms, x2, ±20 % jitter, max 150 s), never waiting past expiry and
    /// keeping the old certificate meanwhile.
    pub async fn get(&self, id: &Identity) -> Result<watch::Receiver<Arc<WorkloadCert>>, Error> {
        let slot = self.slots.lock().entry(id.clone()).or_default().clone();
        let rotation = slot.rotation.get_or_try_init(|| self.start(id)).await?;
        Ok(rotation.cert.subscribe())
    }

    /// Stops rotating and drops the certificate for `id`. Receivers keep the last value they
    /// saw, and `changed()` on them returns an error. A `get` racing with this may still return
    /// a receiver; its certificate is then not rotated.
    pub fn forget(&self, id: &Identity) {
        let slot = self.slots.lock().remove(id);
        drop(slot);
    }

    /// Fetches the first certificate and spawns the task that rotates it.
    async fn start(&self, id: &Identity) -> Result<Rotation, Error> {
        let cert = Arc::new(self.source.fetch(id).await?);
        let (tx, _) = watch::channel(cert.clone());
        let task = tokio::spawn(rotate(
            self.source.clone(),
            self.timing,
            id.clone(),
            tx.clone(),
            cert,
        ));
        Ok(Rotation {
            cert: tx,
            task: task.abort_handle(),
        })
    }
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("identities", &self.slots.lock().len())
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

/// Refreshes `current` at half-life, forever (until aborted).
async fn rotate(
    source: Arc<dyn CertSource>,
    timing: Timing,
    id: Identity,
    tx: watch::Sender<Arc<WorkloadCert>>,
    mut current: Arc<WorkloadCert>,
) {
    loop {
        let wait = until(current.refresh_at()).max(timing.min_refresh_delay);
        tracing::debug!(%id, ?wait, "next certificate refresh");
        tokio::time::sleep(wait).await;
        current = refetch(&*source, timing, &id, &current).await;
        tracing::info!(%id, not_after = ?current.not_after, "rotated workload certificate");
        tx.send_replace(current.clone());
    }
}

/// Fetches until it succeeds, backing off between failures.
async fn refetch(
    source: &dyn CertSource,
    timing: Timing,
    id: &Identity,
    current: &WorkloadCert,
) -> Arc<WorkloadCert> {
    let mut backoff = Backoff::new(timing);
    loop {
        let error = match source.fetch(id).await {
            Ok(cert) => return Arc::new(cert),
            Err(error) => error,
        };
        let to_expiry = until(current.not_after);
        let delay = retry_delay(backoff.next_delay(), to_expiry);
        tracing::warn!(
            %id,
            %error,
            retry_in = ?delay,
            expired = to_expiry.is_zero(),
            "certificate refresh failed; keeping the current certificate"
        );
        tokio::time::sleep(delay).await;
    }
}

/// The backoff delay, cut short so that the retry happens no later than the current
/// certificate's expiry (`to_expiry`; zero once expired, when plain backoff applies).
fn retry_delay(backoff: Duration, to_expiry: Duration) -> Duration {
    if to_expiry.is_zero() {
        backoff
    } else {
        backoff.min(to_expiry)
    }
}

/// Time from now until `t` (zero if `t` has passed).
fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Exponential backoff (x2) with jitter, capped.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(timing: Timing) -> Self {
        Self {
            next: timing.initial_backoff,
            max: timing.max_backoff,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let factor = rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER);
        base.mul_f64(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests;
