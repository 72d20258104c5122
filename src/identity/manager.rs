//! `CertManager`: one current certificate per identity in use, fetched on first use, rotated, and
//! released when its last user goes.
//!
//! Input: a [`CertSource`] (and, through it, the configured root bundle, if any) and the identities
//! the proxy asks for. Output: per identity, a [`CertWatch`] (a `watch::Receiver<Arc<WorkloadCert>>`
//! that always holds a usable certificate) which also counts as one user of the identity.
//!
//! The first `get` for an identity fetches (concurrent callers share that single fetch). A
//! background task then re-fetches at [`WorkloadCert::refresh_at`] (half-life) and publishes the
//! result. If a fetch fails the old certificate stays published and the task retries with
//! exponential backoff (500 ms, x2, ±20 % jitter, at most 150 s), never sleeping past the old
//! certificate's expiry. The published certificate's roots are the source's roots plus the source's
//! [`TrustBundle`]; when the bundle changes the certificate is published again with the new roots.
//!
//! Users: every [`CertWatch`] handed out by `get` (and its clones) is one reference; a pod's proxy holds
//! one for as long as it lives, i.e. until its connections have drained. When the last reference to an
//! identity is dropped the identity is forgotten: the rotation stops and the key is dropped, and a later
//! `get` fetches a fresh certificate. Pods sharing a service account share the identity and its count.
//! `forget` (or dropping the manager) stops the task and closes the channel at once.
//! Time: sleeps use `tokio::time`; certificate times are compared with the wall clock
//! (`SystemTime::now()`), re-read before every sleep so clock corrections are followed.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::{watch, OnceCell};
use tokio::task::AbortHandle;

use super::{CertSource, Error, Identity, TrustBundle, WorkloadCert};

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
    /// Roots trusted besides each certificate's own (the source's configured bundle).
    bundle: Option<TrustBundle>,
    /// This manager, for the [`CertWatch`]es to report their release to.
    me: Weak<CertManager>,
    /// One slot per identity in use. Locked only to look up or change the map or a slot's user
    /// count, never across an `.await`.
    slots: Mutex<HashMap<Identity, Arc<Slot>>>,
}

/// The state for one identity: empty until the first fetch succeeds.
#[derive(Default)]
struct Slot {
    rotation: OnceCell<Rotation>,
    /// Live [`CertWatch`] references handed out for this slot. Changed only under the `slots` lock.
    users: AtomicUsize,
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

/// A certificate channel for one identity, as handed out by [`CertManager::get`]. Reads like the
/// `watch::Receiver` it wraps. While it (or a clone) lives, the identity counts as in use; dropping
/// the last one for an identity makes the manager forget it.
#[derive(Clone)]
pub struct CertWatch {
    rx: watch::Receiver<Arc<WorkloadCert>>,
    _user: Option<Arc<User>>,
}

/// One reference to an identity; dropping it releases the reference.
struct User {
    manager: Weak<CertManager>,
    id: Identity,
    slot: Weak<Slot>,
}

impl Drop for User {
    fn drop(&mut self) {
        if let Some(manager) = self.manager.upgrade() {
            manager.release(&self.id, &self.slot);
        }
    }
}

impl Deref for CertWatch {
    type Target = watch::Receiver<Arc<WorkloadCert>>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl DerefMut for CertWatch {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

/// A bare channel (a certificate no manager rotates, e.g. in tests): holds no identity in use.
impl From<watch::Receiver<Arc<WorkloadCert>>> for CertWatch {
    fn from(rx: watch::Receiver<Arc<WorkloadCert>>) -> Self {
        Self { rx, _user: None }
    }
}

impl std::fmt::Debug for CertWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertWatch")
            .field("identity", &self.rx.borrow().identity)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager fetching from `source`.
    pub fn new(source: Arc<dyn CertSource>) -> Arc<Self> {
        Self::with_timing(source, Timing::PRODUCTION)
    }

    /// A manager with other refresh/retry timing (tests).
    pub(crate) fn with_timing(source: Arc<dyn CertSource>, timing: Timing) -> Arc<Self> {
        let bundle = source.trust_bundle();
        Arc::new_cyclic(|me| Self {
            source,
            timing,
            bundle,
            me: me.clone(),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate channel for `id`; the returned [`CertWatch`] counts as one user of `id`.
    ///
    /// The first call for an identity fetches (callers wait; concurrent callers share the one
    /// fetch; if it fails each waiting caller in turn tries again); later calls return a receiver
    /// of the same channel. A background task (`tokio::spawn`) re-fetches at
    /// [`WorkloadCert::refresh_at`] and publishes the new certificate; on failure it retries with
    /// exponential backoff (500 ms, x2, ±20 % jitter, max 150 s), never waiting past expiry and
    /// keeping the old certificate meanwhile.
    pub async fn get(&self, id: &Identity) -> Result<CertWatch, Error> {
        loop {
            let slot = self.slots.lock().entry(id.clone()).or_default().clone();
            let rotation = match slot.rotation.get_or_try_init(|| self.start(id)).await {
                Ok(r) => r,
                Err(e) => {
                    let mut slots = self.slots.lock();
                    let unused =
                        slot.rotation.get().is_none() && slot.users.load(Ordering::Relaxed) == 0;
                    if unused && slots.get(id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                        slots.remove(id);
                    }
                    return Err(e);
                }
            };
            let mut slots = self.slots.lock();
            // The last user of this slot may have gone while we waited: then it was released, and is
            // taken back (still rotating) unless a newer slot replaced it.
            let current = slots.entry(id.clone()).or_insert_with(|| slot.clone());
            if !Arc::ptr_eq(current, &slot) {
                continue;
            }
            slot.users.fetch_add(1, Ordering::Relaxed);
            let rx = rotation.cert.subscribe();
            drop(slots);
            return Ok(CertWatch {
                rx,
                _user: Some(Arc::new(User {
                    manager: self.me.clone(),
                    id: id.clone(),
                    slot: Arc::downgrade(&slot),
                })),
            });
        }
    }

    /// Stops rotating and drops the certificate for `id` now, whoever still uses it. Receivers keep
    /// the last value they saw, and `changed()` on them returns an error. A `get` racing with this may
    /// take the identity back.
    pub fn forget(&self, id: &Identity) {
        let slot = self.slots.lock().remove(id);
        if slot.is_some() {
            tracing::info!(%id, "certificate forgotten");
        }
        drop(slot);
    }

    /// The identities held (fetched or being fetched), sorted.
    pub fn identities(&self) -> Vec<Identity> {
        let mut ids: Vec<Identity> = self.slots.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Every identity held and its certificate: `None` while the first fetch is under way. Sorted by
    /// identity (read by the admin port's `/config_dump`).
    pub fn certificates(&self) -> Vec<(Identity, Option<Arc<WorkloadCert>>)> {
        let mut held: Vec<_> = self
            .slots
            .lock()
            .iter()
            .map(|(id, slot)| {
                (
                    id.clone(),
                    slot.rotation.get().map(|r| r.cert.borrow().clone()),
                )
            })
            .collect();
        held.sort_by(|a, b| a.0.cmp(&b.0));
        held
    }

    /// One user of `slot` (for `id`) went; the last one forgets the identity.
    fn release(&self, id: &Identity, slot: &Weak<Slot>) {
        let mut slots = self.slots.lock();
        let Some(slot) = slot.upgrade() else {
            return; // already forgotten
        };
        let left = slot.users.fetch_sub(1, Ordering::Relaxed) - 1;
        let removed = if left == 0 && slots.get(id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            slots.remove(id)
        } else {
            None
        };
        drop(slots);
        if removed.is_some() {
            tracing::info!(%id, "no workload uses this identity any more; certificate released");
        }
    }

    /// Fetches the first certificate and spawns the task that rotates it.
    async fn start(&self, id: &Identity) -> Result<Rotation, Error> {
        let cert = Arc::new(self.source.fetch(id).await?);
        let (tx, _) = watch::channel(with_bundle(&cert, self.bundle.as_ref()));
        let task = tokio::spawn(rotate(
            self.source.clone(),
            self.timing,
            id.clone(),
            tx.clone(),
            cert,
            self.bundle.clone(),
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

/// `cert` with the bundle's roots added to its own (each root once). `cert` itself when the bundle adds
/// nothing.
fn with_bundle(cert: &Arc<WorkloadCert>, bundle: Option<&TrustBundle>) -> Arc<WorkloadCert> {
    let Some(bundle) = bundle else {
        return cert.clone();
    };
    let extra = bundle.roots();
    if extra.iter().all(|r| cert.roots.contains(r)) {
        return cert.clone();
    }
    let mut merged = WorkloadCert::clone(cert);
    for root in extra.iter() {
        if !merged.roots.contains(root) {
            merged.roots.push(root.clone());
        }
    }
    Arc::new(merged)
}

/// Refreshes `current` at half-life, forever (until aborted); publishes it again with new roots whenever
/// the bundle changes.
async fn rotate(
    source: Arc<dyn CertSource>,
    timing: Timing,
    id: Identity,
    tx: watch::Sender<Arc<WorkloadCert>>,
    mut current: Arc<WorkloadCert>,
    mut bundle: Option<TrustBundle>,
) {
    loop {
        let wait = until(current.refresh_at()).max(timing.min_refresh_delay);
        tracing::debug!(%id, ?wait, "next certificate refresh");
        let bundle_changed = async {
            match bundle.as_mut() {
                Some(b) => b.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = bundle_changed => {
                tracing::info!(%id, "root bundle changed; republishing the certificate with the new roots");
                tx.send_replace(with_bundle(&current, bundle.as_ref()));
                continue;
            }
        }
        current = refetch(&*source, timing, &id, &current).await;
        tracing::info!(%id, not_after = ?current.not_after, "rotated workload certificate");
        tx.send_replace(with_bundle(&current, bundle.as_ref()));
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
