//! Tests for `CertManager`: single first fetch, rotation at half-life, retries with backoff
//! while keeping the old certificate, the expiry cap, and `forget`.
//!
//! They use a fake source handing out short-lived certificates, the retry timing shrunk (`FAST`), and
//! tokio's paused clock (`start_paused`): the clock stands still while any task can run and, once all
//! wait, jumps straight to the next timer. So the time that passes between two fetches is exactly the
//! wait the manager chose, whatever the load on the machine, and the tests assert those waits exactly
//! (to tokio's 1 ms timer tick) instead of bounding wall-clock time. The manager reads certificate
//! times from the wall clock, which barely moves meanwhile; where that matters the tests account for
//! it with wall-clock readings of their own, never with a constant. Only the test with a real CA at
//! production timing runs in real time (it asserts nothing about time).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use tokio::time::Instant;

use super::*;
use crate::identity::{BoxFuture, BuiltinCa};

/// Retry timing shrunk 25x from production.
const FAST: Timing = Timing {
    initial_backoff: Duration::from_millis(20),
    max_backoff: Duration::from_millis(200),
    min_refresh_delay: Duration::from_millis(20),
};

/// Bound on waiting for something that should happen well within a second (paused-clock time: it only
/// passes once nothing else can happen, so it never runs out on a busy machine).
const PATIENCE: Duration = Duration::from_secs(10);

/// Resolution of tokio's timers: a sleep ends on the first millisecond tick at or after its deadline.
const TICK: Duration = Duration::from_millis(1);

/// Fetches after which the fake source stops answering: a manager polling in a loop (which in paused
/// time would never let the clock move) then stalls, and the test's own timers fail it instead of
/// hanging.
const RUNAWAY: usize = 1000;

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).unwrap()
}

/// Hands out copies of one real certificate re-dated to `[now - backdate, now - backdate + ttl]`.
struct FakeSource {
    template: WorkloadCert,
    ttl: Duration,
    backdate: Duration,
    /// How long each fetch takes.
    latency: Duration,
    /// The next this many fetches fail.
    failures: AtomicUsize,
    /// When each fetch started (tokio's clock).
    attempts: parking_lot::Mutex<Vec<Instant>>,
    /// When each fetch started (the wall clock, which the manager compares certificate times with).
    wall: parking_lot::Mutex<Vec<SystemTime>>,
}

impl FakeSource {
    fn new(ttl: Duration) -> Self {
        let ca_ttl = Duration::from_secs(3600);
        let ca = BuiltinCa::ephemeral(ca_ttl).unwrap();
        let now = SystemTime::now();
        let template = ca.issue(&id("template"), now, now + ca_ttl).unwrap();
        Self {
            template,
            ttl,
            backdate: Duration::ZERO,
            latency: Duration::ZERO,
            failures: AtomicUsize::new(0),
            attempts: parking_lot::Mutex::new(Vec::new()),
            wall: parking_lot::Mutex::new(Vec::new()),
        }
    }

    fn fetches(&self) -> usize {
        self.attempts.lock().len()
    }

    /// Gaps between consecutive fetch attempts.
    fn gaps(&self) -> Vec<Duration> {
        let attempts = self.attempts.lock();
        attempts.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

impl CertSource for FakeSource {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>> {
        Box::pin(async move {
            self.wall.lock().push(SystemTime::now());
            let n = {
                let mut attempts = self.attempts.lock();
                attempts.push(Instant::now());
                attempts.len()
            };
            if n > RUNAWAY {
                std::future::pending::<()>().await;
            }
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let failing = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(Error::Read {
                    path: "fake-ca".into(),
                    source: std::io::Error::other("CA unavailable"),
                });
            }
            let mut cert = self.template.clone();
            cert.identity = id.clone();
            cert.not_before = SystemTime::now() - self.backdate;
            cert.not_after = cert.not_before + self.ttl;
            Ok(cert)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_gets_share_one_fetch() {
    let source = Arc::new(FakeSource {
        latency: Duration::from_millis(100),
        ..FakeSource::new(Duration::from_secs(3600))
    });
    let manager = CertManager::with_timing(source.clone(), FAST);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let manager = manager.clone();
        tasks.spawn(async move { manager.get(&id("a")).await.unwrap() });
    }
    let receivers = tasks.join_all().await;

    assert_eq!(source.fetches(), 1);
    let first = receivers[0].borrow().clone();
    assert!(receivers.iter().all(|rx| Arc::ptr_eq(&rx.borrow(), &first)));
    let later = manager.get(&id("a")).await.unwrap();
    assert!(Arc::ptr_eq(&later.borrow(), &first));
    assert_eq!(source.fetches(), 1);

    manager.get(&id("b")).await.unwrap();
    assert_eq!(source.fetches(), 2);
}

/// The refresh is scheduled for the published certificate's `refresh_at` (half-way through its life):
/// the paused clock moves from the first fetch to the second by exactly the wait the manager chose,
/// which it computed as `refresh_at - now` at some wall-clock instant between the first certificate's
/// `not_before` and the second fetch.
#[tokio::test(start_paused = true)]
async fn publishes_a_new_certificate_at_half_life() {
    let life = Duration::from_secs(2);
    let source = Arc::new(FakeSource::new(life));
    let manager = CertManager::with_timing(source.clone(), FAST);
    let mut rx = manager.get(&id("a")).await.unwrap();
    let first = rx.borrow_and_update().clone();
    assert_eq!(first.refresh_at(), first.not_before + life / 2);

    tokio::time::timeout(PATIENCE, rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(source.fetches(), 2);
    let waited = source.gaps()[0];
    let second_fetch = source.wall.lock()[1];
    let latest = first.refresh_at().duration_since(first.not_before).unwrap() + TICK;
    let earliest = first
        .refresh_at()
        .duration_since(second_fetch)
        .unwrap_or_default();
    assert!(
        (earliest..=latest).contains(&waited),
        "refreshed {waited:?} after the first fetch; refresh_at was {earliest:?}..{latest:?} away"
    );
    let second = rx.borrow_and_update().clone();
    assert_eq!(second.identity, id("a"));
    assert!(
        second.not_before >= first.not_before,
        "an older certificate"
    );
}

#[tokio::test(start_paused = true)]
async fn failing_refresh_keeps_the_old_cert_and_backs_off() {
    let source = Arc::new(FakeSource::new(Duration::from_secs(1)));
    let manager = CertManager::with_timing(source.clone(), FAST);
    let mut rx = manager.get(&id("a")).await.unwrap();
    let first = rx.borrow_and_update().clone();
    source.failures.store(3, Ordering::SeqCst);

    tokio::time::timeout(PATIENCE, rx.changed())
        .await
        .unwrap()
        .unwrap();
    // Nothing was published for the three failures: the one change came with the 4th attempt.
    assert_eq!(source.fetches(), 1 + 4);
    assert!(rx.borrow().not_before >= first.not_before);
    assert!(!Arc::ptr_eq(&rx.borrow(), &first));
    // The retries back off from FAST's 20 ms, doubling, each jittered by ±20 % (to the timer tick).
    let gaps = source.gaps();
    for (gap, base) in gaps[1..]
        .iter()
        .zip([20, 40, 80].map(Duration::from_millis))
    {
        let (low, high) = (base.mul_f64(0.8), base.mul_f64(1.2) + TICK);
        assert!(
            (low..=high).contains(gap),
            "retry after {gap:?}, want {base:?} ±20 %"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_handing_out_expired_certs_is_not_polled_in_a_loop() {
    let source = Arc::new(FakeSource {
        backdate: Duration::from_secs(20),
        ..FakeSource::new(Duration::from_secs(10))
    });
    let manager = CertManager::with_timing(source.clone(), FAST);
    let _rx = manager.get(&id("a")).await.unwrap();
    // Each certificate is due at once, so the manager waits only its minimum refresh delay: one fetch
    // every 20 ms, the first one at 0 (190 ms keeps clear of a fetch at the same tick as the test's wake).
    tokio::time::sleep(Duration::from_millis(190)).await;
    assert_eq!(source.fetches(), 10, "fetches in 190 ms");
    for gap in source.gaps() {
        assert!(
            (FAST.min_refresh_delay..=FAST.min_refresh_delay + TICK).contains(&gap),
            "fetched again after {gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn forget_stops_rotation_and_closes_the_channel() {
    let source = Arc::new(FakeSource::new(Duration::from_millis(200)));
    let manager = CertManager::with_timing(source.clone(), FAST);
    let mut rx = manager.get(&id("a")).await.unwrap();

    manager.forget(&id("a"));
    let changed = tokio::time::timeout(PATIENCE, rx.changed()).await.unwrap();
    assert!(changed.is_err(), "channel still open");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(source.fetches(), 1);

    // Asking again starts afresh.
    manager.get(&id("a")).await.unwrap();
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn failed_first_fetch_is_reported_and_retried_by_the_next_get() {
    let source = Arc::new(FakeSource::new(Duration::from_secs(3600)));
    source.failures.store(1, Ordering::SeqCst);
    let manager = CertManager::with_timing(source.clone(), FAST);

    let err = manager.get(&id("a")).await.expect_err("fetch error hidden");
    assert!(err.to_string().contains("fake-ca"), "{err}");
    manager.get(&id("a")).await.unwrap();
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_manager_stops_rotation() {
    let source = Arc::new(FakeSource::new(Duration::from_millis(200)));
    let manager = CertManager::with_timing(source.clone(), FAST);
    let mut rx = manager.get(&id("a")).await.unwrap();
    drop(manager);
    let changed = tokio::time::timeout(PATIENCE, rx.changed()).await.unwrap();
    assert!(changed.is_err());
    assert_eq!(source.fetches(), 1);
}

/// Real CA, production timing: the rotated leaf is a new certificate that still verifies.
#[tokio::test]
async fn rotates_real_builtin_certificates() {
    let ca = Arc::new(BuiltinCa::ephemeral(Duration::from_secs(2)).unwrap());
    let manager = CertManager::new(ca);
    let mut rx = manager.get(&id("a")).await.unwrap();
    let first = rx.borrow_and_update().clone();
    tokio::time::timeout(PATIENCE, rx.changed())
        .await
        .expect("no rotation")
        .unwrap();
    let second = rx.borrow().clone();
    assert_ne!(first.chain[0], second.chain[0]);
    crate::identity::signer::verify(&second, SystemTime::now()).unwrap();
}

#[test]
fn production_backoff_doubles_from_half_a_second_with_jitter_up_to_150_s() {
    let mut backoff = Backoff::new(Timing::PRODUCTION);
    let mut base = 0.5_f64;
    for _ in 0..15 {
        let delay = backoff.next_delay().as_secs_f64();
        let capped = base.min(150.0);
        assert!(
            (capped * 0.8..=capped * 1.2).contains(&delay) && delay <= 150.0,
            "delay {delay} s, want {capped} s ±20% and at most 150 s"
        );
        base *= 2.0;
    }
}

#[test]
fn retries_are_never_scheduled_past_expiry() {
    let s = Duration::from_secs;
    assert_eq!(retry_delay(s(8), s(3)), s(3));
    assert_eq!(retry_delay(s(2), s(3)), s(2));
    // Already expired: plain backoff.
    assert_eq!(retry_delay(s(8), Duration::ZERO), s(8));
}

// ---- identities no one uses any more are released ----

/// Waits until `manager` holds exactly `want`.
async fn held(manager: &CertManager, want: &[Identity]) {
    tokio::time::timeout(PATIENCE, async {
        while manager.identities() != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("held {:?}, want {want:?}", manager.identities()));
}

#[tokio::test(start_paused = true)]
async fn an_identity_no_one_uses_any_more_is_released_and_no_longer_rotated() {
    // 200 ms certificates: held ones rotate every 100 ms.
    let source = Arc::new(FakeSource::new(Duration::from_millis(200)));
    let manager = CertManager::with_timing(source.clone(), FAST);
    let rx = manager.get(&id("a")).await.unwrap();
    assert_eq!(manager.identities(), vec![id("a")]);
    drop(rx);
    held(&manager, &[]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(source.fetches(), 1, "a released identity was rotated");
}

#[tokio::test(start_paused = true)]
async fn pods_sharing_an_identity_keep_it_until_the_last_one_goes() {
    let source = Arc::new(FakeSource::new(Duration::from_millis(200)));
    let manager = CertManager::with_timing(source.clone(), FAST);
    let first_pod = manager.get(&id("a")).await.unwrap();
    let mut second_pod = manager.get(&id("a")).await.unwrap();
    let clone_of_first = first_pod.clone();
    manager.get(&id("b")).await.unwrap(); // used and dropped at once
    assert_eq!(source.fetches(), 2);
    held(&manager, &[id("a")]).await;

    drop(first_pod);
    drop(clone_of_first);
    // Still held by the second pod, and still rotating for it.
    second_pod.borrow_and_update();
    tokio::time::timeout(PATIENCE, second_pod.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(manager.identities(), vec![id("a")]);

    drop(second_pod);
    held(&manager, &[]).await;
}

#[tokio::test(start_paused = true)]
async fn a_pod_added_again_after_release_gets_a_fresh_certificate() {
    let source = Arc::new(FakeSource::new(Duration::from_secs(3600)));
    let manager = CertManager::with_timing(source.clone(), FAST);
    let rx = manager.get(&id("a")).await.unwrap();
    let old = rx.borrow().clone();
    drop(rx);
    held(&manager, &[]).await;

    let rx = manager.get(&id("a")).await.unwrap();
    assert_eq!(source.fetches(), 2, "no new fetch for the returning pod");
    assert!(!Arc::ptr_eq(&rx.borrow(), &old));
    assert_eq!(manager.identities(), vec![id("a")]);
}

#[tokio::test(start_paused = true)]
async fn a_certificate_still_read_after_release_stays_valid_but_is_no_longer_rotated() {
    // What a connection in flight holds is its TLS session, built from the material it started with;
    // the released channel just stops changing.
    let source = Arc::new(FakeSource::new(Duration::from_millis(200)));
    let manager = CertManager::with_timing(source.clone(), FAST);
    let mut rx = manager.get(&id("a")).await.unwrap();
    let kept = rx.borrow_and_update().clone();
    manager.forget(&id("a"));
    assert!(tokio::time::timeout(PATIENCE, rx.changed())
        .await
        .unwrap()
        .is_err());
    assert!(Arc::ptr_eq(&rx.borrow(), &kept));
    // The late release of that watch does not touch a newer slot for the same identity.
    let newer = manager.get(&id("a")).await.unwrap();
    drop(rx);
    assert_eq!(manager.identities(), vec![id("a")]);
    drop(newer);
    held(&manager, &[]).await;
}

#[tokio::test(start_paused = true)]
async fn the_source_trust_bundle_is_added_to_every_certificate_and_followed() {
    let fresh_root = || {
        let ca = BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap();
        ca.roots()[0].clone()
    };
    let (extra1, extra2) = (fresh_root(), fresh_root());
    let (tx, bundle_rx) = watch::channel(Arc::new(vec![extra1.clone()]));
    struct WithBundle(FakeSource, TrustBundle);
    impl CertSource for WithBundle {
        fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>> {
            self.0.fetch(id)
        }
        fn trust_bundle(&self) -> Option<TrustBundle> {
            Some(self.1.clone())
        }
    }
    let source = WithBundle(
        FakeSource::new(Duration::from_secs(3600)),
        TrustBundle::from_receiver(bundle_rx),
    );
    let own = source.0.template.roots.clone();
    let manager = CertManager::with_timing(Arc::new(source), FAST);
    let mut rx = manager.get(&id("a")).await.unwrap();
    let first = rx.borrow_and_update().clone();
    assert_eq!(first.roots, [own.clone(), vec![extra1.clone()]].concat());

    tx.send_replace(Arc::new(vec![extra2.clone(), own[0].clone()]));
    tokio::time::timeout(PATIENCE, rx.changed())
        .await
        .unwrap()
        .unwrap();
    let second = rx.borrow().clone();
    assert_eq!(second.roots, [own, vec![extra2]].concat());
    assert_eq!(second.chain, first.chain, "same certificate, new roots");
}
