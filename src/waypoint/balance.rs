//! Endpoint choice and DestinationRule traffic policy for one cluster (Envoy's `outbound|port|subset|host`
//! cluster at the waypoint): load balancing, outlier detection (passive ejection), and connection-pool
//! admission (circuit breaking).
//!
//! Owner: the waypoint. Whoever applies a new `Waypoint` configuration builds one [`Endpoints`] per
//! cluster (keeping the old one while its name and policy are unchanged, so ejections and counters
//! survive); the request handler calls [`Endpoints::admit`] (`None`: answer 503, flag `UO`), then
//! [`Endpoints::pick`] (`None`: answer 503 `UH`, "no healthy upstream"), holds [`Endpoints::begin`] while
//! the request is in flight, and reports each try with [`Endpoints::record`]. No I/O and no clock: the
//! caller passes `now`. Shared between worker threads (`Send + Sync`); a `parking_lot::Mutex` guards the
//! outlier state for the length of one call, everything else is atomics.
//!
//! **Inputs.** A `crate::proto::waypoint::Cluster` (endpoints named by workload uid, `LoadBalancer`,
//! `ConnectionPool`, `OutlierDetection`); per request `now`, the endpoint tried before (for a retry), and
//! outcomes. **Outputs.** Endpoint uids, [`Permit`]s and [`Active`] guards.
//!
//! **Load balancing** among endpoints not ejected: `ROUND_ROBIN` (Envoy's default; starts at a random
//! endpoint), `RANDOM`, `LEAST_REQUEST` (Envoy's power of two choices: the less busy of two random
//! endpoints, busy = [`Active`] guards held). `PASSTHROUGH` is balanced round-robin: the waypoint always
//! picks an endpoint itself. A retry passes the endpoint it tried (`exclude`) and gets another one when
//! there is one (Istio's `previous_hosts` predicate), else the same.
//!
//! **Outlier detection** (Envoy with Istio's settings, external and local errors not split): a response
//! with a 5xx status counts towards `consecutive_5xx_errors`, a 502/503/504 also towards
//! `consecutive_gateway_errors`; a connect failure or a reset counts as a 503; any other outcome resets
//! both counts. A count reaching its (non-zero) threshold ejects the endpoint for `base_ejection_time`
//! (default 30 s) × its ejection count, capped at Envoy's `max_ejection_time` (300 s), and restarts the
//! count. The ejection count drops by one per `interval` (default 10 s) the endpoint spends un-ejected.
//! An endpoint is not ejected if that would put more than `max_ejection_percent` (0 → Envoy's 10 %) of the
//! cluster out, counted as current Envoy does (`always_eject_one_host` off: with the default 10 %, a
//! cluster of fewer than ten endpoints never ejects). Un-ejection happens at the ejection's end time
//! rather than at the next interval tick.
//!
//! **All ejected.** Istio sets Envoy's `healthy_panic_threshold` to the DestinationRule's
//! `minHealthPercent` (0 unless set, which turns panic mode off) whenever it configures outlier
//! detection, so Envoy stops sending to an all-ejected cluster and answers 503 `UH`. [`Endpoints::pick`]
//! does the same: `None`.
//!
//! **Connection pool.** Zero fields mean Istio's defaults (no limit; Istio sets every Envoy circuit
//! breaker to 2³²−1). [`Endpoints::admit`] admits a request while fewer than `http2_max_requests` are in
//! flight and, when `max_connections` is set, fewer than `max_connections + http1_max_pending_requests`
//! (HTTP/1.1 upstream: one request per connection, the rest wait as pending);
//! [`Endpoints::admit_multiplexed`] applies only the first limit (HTTP/2 upstreams);
//! [`Endpoints::admit_retry`] bounds retries in flight by `max_retries`. Connection counts, timeouts and
//! per-connection request limits are the upstream pool's to apply, from [`Endpoints::limits`].

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::proto::waypoint as pb;

/// Envoy's default `base_ejection_time`.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Envoy's default outlier detection `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Envoy's default `max_ejection_time`, which caps base × ejection count (never below the base).
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Envoy's default `max_ejection_percent` (Istio leaves 0 to Envoy).
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Istio's default connect timeout (`meshConfig.connectTimeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy's default idle timeout of upstream HTTP connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How to choose among endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lb {
    /// In turn (also used for `PASSTHROUGH`).
    RoundRobin,
    /// The less busy of two random endpoints.
    LeastRequest,
    /// Uniformly at random.
    Random,
}

/// The outcome of one try, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a 5xx.
    Success,
    /// A response with this status.
    Status(u16),
    /// The connection (or tunnel) to the endpoint could not be opened; counts as a 503.
    ConnectFailure,
    /// Reset or closed before a response; counts as a 503.
    Reset,
}

/// DestinationRule `connectionPool`, resolved: `None` = no limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLimits {
    /// `tcp.maxConnections`: upstream connections at once.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight.
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: requests before a connection is closed.
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries in flight.
    pub max_retries: Option<u32>,
    /// `tcp.connectTimeout` (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// `http.idleTimeout` (default [`DEFAULT_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
}

/// DestinationRule `outlierDetection`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// 5xx responses in a row that eject; 0: off.
    pub consecutive_5xx: u32,
    /// 502/503/504 responses in a row that eject; 0: off.
    pub consecutive_gateway: u32,
    /// How often an ejection count decays by one.
    pub interval: Duration,
    /// The first ejection's length.
    pub base_ejection_time: Duration,
    /// The most of the cluster that may be ejected at once, in percent.
    pub max_ejection_percent: u32,
}

/// One request admitted by [`Endpoints::admit`] (or a retry by [`Endpoints::admit_retry`]); the slot is
/// free again when this is dropped.
#[derive(Debug)]
#[must_use = "the request is admitted only while the permit is held"]
pub struct Permit {
    counter: Arc<AtomicU32>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in flight to one endpoint, counted for `LEAST_REQUEST` until dropped.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while this is held"]
pub struct Active {
    counts: Arc<[AtomicU32]>,
    index: usize,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.counts[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-endpoint outlier state.
#[derive(Debug, Default, Clone)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// The current (or last) ejection's end.
    ejected_until: Option<Instant>,
    /// Ejections counted for the backoff, before decay since `ejected_until`.
    ejections: u32,
}

impl Health {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// One cluster's endpoints and policy state; see the module docs.
#[derive(Debug)]
pub struct Endpoints {
    name: String,
    keys: Vec<Box<str>>,
    index: HashMap<Box<str>, usize>,
    lb: Lb,
    outlier: Option<OutlierPolicy>,
    limits: PoolLimits,
    /// Admission limit of [`Endpoints::admit`].
    capacity: u32,
    rr: AtomicUsize,
    rng: AtomicU64,
    active: Arc<[AtomicU32]>,
    health: Mutex<Vec<Health>>,
    in_flight: Arc<AtomicU32>,
    retries: Arc<AtomicU32>,
}

impl Endpoints {
    /// The cluster's endpoints and policies, with no ejections and nothing in flight.
    pub fn new(cluster: &pb::Cluster) -> Endpoints {
        Endpoints::with_seed(cluster, rand::random())
    }

    /// As [`Endpoints::new`], with the random choices (round-robin start, `RANDOM`, `LEAST_REQUEST`)
    /// drawn from `seed`: for tests and reproducible benches.
    pub fn with_seed(cluster: &pb::Cluster, seed: u64) -> Endpoints {
        let mut keys: Vec<Box<str>> = Vec::with_capacity(cluster.endpoints.len());
        let mut index = HashMap::with_capacity(cluster.endpoints.len());
        for uid in &cluster.endpoints {
            if !index.contains_key(uid.as_str()) {
                index.insert(uid.as_str().into(), keys.len());
                keys.push(uid.as_str().into());
            }
        }
        let lb = match cluster
            .load_balancer
            .as_ref()
            .and_then(|l| pb::load_balancer::Simple::try_from(l.simple).ok())
        {
            Some(pb::load_balancer::Simple::LeastRequest) => Lb::LeastRequest,
            Some(pb::load_balancer::Simple::Random) => Lb::Random,
            _ => Lb::RoundRobin,
        };
        let limits = pool_limits(cluster.connection_pool.as_ref());
        let outlier = cluster.outlier_detection.as_ref().and_then(outlier_policy);
        let unlimited = |v: Option<u32>| v.unwrap_or(u32::MAX);
        let per_connection = match limits.max_connections {
            Some(c) => c.saturating_add(unlimited(limits.max_pending_requests)),
            None => u32::MAX,
        };
        let n = keys.len();
        Endpoints {
            name: cluster.name.clone(),
            index,
            lb,
            outlier,
            capacity: unlimited(limits.max_requests).min(per_connection),
            limits,
            rr: AtomicUsize::new(if n == 0 { 0 } else { (seed as usize) % n }),
            rng: AtomicU64::new(seed),
            active: (0..n).map(|_| AtomicU32::new(0)).collect(),
            health: Mutex::new(vec![Health::default(); n]),
            in_flight: Arc::new(AtomicU32::new(0)),
            retries: Arc::new(AtomicU32::new(0)),
            keys,
        }
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The endpoints' workload uids, in configuration order (duplicates dropped).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| &**k)
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the cluster has no endpoints.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The load-balancing policy.
    pub fn lb(&self) -> Lb {
        self.lb
    }

    /// The connection-pool limits, for the upstream pool.
    pub fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    /// The outlier detection policy, if any.
    pub fn outlier(&self) -> Option<&OutlierPolicy> {
        self.outlier.as_ref()
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether `endpoint` is ejected at `now`.
    pub fn is_ejected(&self, endpoint: &str, now: Instant) -> bool {
        match (self.index.get(endpoint), &self.outlier) {
            (Some(&i), Some(_)) => self.health.lock()[i].is_ejected(now),
            _ => false,
        }
    }

    /// An endpoint for the next try, among those not ejected at `now`, avoiding `exclude` (the endpoint
    /// of the previous try) unless it is the only one. `None` when the cluster has no endpoints or all
    /// are ejected (answer 503 `UH`).
    pub fn pick(&self, now: Instant, exclude: Option<&str>) -> Option<&str> {
        if self.keys.is_empty() {
            return None;
        }
        let health = self.outlier.as_ref().map(|_| self.health.lock());
        let up = |i: usize| health.as_ref().is_none_or(|h| !h[i].is_ejected(now));
        let excluded = exclude.and_then(|e| self.index.get(e).copied());
        let candidate =
            |i: usize, avoid_excluded: bool| up(i) && !(avoid_excluded && Some(i) == excluded);
        let count_with = |avoid: bool| {
            (0..self.keys.len())
                .filter(|&i| candidate(i, avoid))
                .count()
        };
        let mut avoid = true;
        let mut count = count_with(avoid);
        if count == 0 {
            // Only the excluded endpoint is left (or nothing): retry it rather than fail.
            avoid = false;
            count = count_with(avoid);
            if count == 0 {
                return None;
            }
        }
        let nth = |k: usize| {
            (0..self.keys.len())
                .filter(|&i| candidate(i, avoid))
                .nth(k)
                .unwrap_or_default()
        };
        let chosen = match self.lb {
            Lb::RoundRobin => nth(self.rr.fetch_add(1, Ordering::Relaxed) % count),
            Lb::Random => nth(self.random_below(count)),
            Lb::LeastRequest => {
                let a = nth(self.random_below(count));
                let b = nth(self.random_below(count));
                let busy = |i: usize| self.active[i].load(Ordering::Relaxed);
                if busy(b) < busy(a) {
                    b
                } else {
                    a
                }
            }
        };
        Some(&self.keys[chosen])
    }

    /// Counts a request in flight to `endpoint` (for `LEAST_REQUEST`) until the guard is dropped; `None`
    /// for an endpoint not in this cluster.
    pub fn begin(&self, endpoint: &str) -> Option<Active> {
        let &index = self.index.get(endpoint)?;
        self.active[index].fetch_add(1, Ordering::Relaxed);
        Some(Active {
            counts: self.active.clone(),
            index,
        })
    }

    /// Reports the outcome of one try to `endpoint` at `now`, for outlier detection (see the module
    /// docs). Unknown endpoints and clusters without outlier detection ignore it.
    pub fn record(&self, endpoint: &str, outcome: Outcome, now: Instant) {
        let (Some(policy), Some(&i)) = (&self.outlier, self.index.get(endpoint)) else {
            return;
        };
        let status = match outcome {
            Outcome::Success => 200,
            Outcome::Status(s) => s,
            Outcome::ConnectFailure | Outcome::Reset => 503,
        };
        let mut health = self.health.lock();
        let h = &mut health[i];
        if !(500..=599).contains(&status) {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            return;
        }
        let mut eject = false;
        if matches!(status, 502..=504) {
            h.consecutive_gateway += 1;
            if policy.consecutive_gateway > 0 && h.consecutive_gateway >= policy.consecutive_gateway
            {
                h.consecutive_gateway = 0;
                eject = true;
            }
        } else {
            h.consecutive_gateway = 0;
        }
        h.consecutive_5xx += 1;
        if policy.consecutive_5xx > 0 && h.consecutive_5xx >= policy.consecutive_5xx {
            h.consecutive_5xx = 0;
            eject = true;
        }
        if eject {
            eject_host(&mut health, i, policy, now);
        }
    }

    /// Admits one request (see the module docs for the limits); `None`: the pool is full (answer 503
    /// `UO`). The slot frees when the permit is dropped.
    pub fn admit(&self) -> Option<Permit> {
        acquire(&self.in_flight, self.capacity)
    }

    /// As [`Endpoints::admit`] for an HTTP/2 upstream, where requests share connections: only
    /// `http2_max_requests` applies.
    pub fn admit_multiplexed(&self) -> Option<Permit> {
        acquire(
            &self.in_flight,
            self.limits.max_requests.unwrap_or(u32::MAX),
        )
    }

    /// Admits one retry (`max_retries` in flight); `None`: do not retry (Envoy's retry overflow).
    pub fn admit_retry(&self) -> Option<Permit> {
        acquire(&self.retries, self.limits.max_retries.unwrap_or(u32::MAX))
    }

    /// `[0, n)`, from the cluster's generator (splitmix64).
    fn random_below(&self, n: usize) -> usize {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n as u64) as usize
    }
}

/// Ejects endpoint `i` unless it is ejected already or `max_ejection_percent` forbids it.
fn eject_host(health: &mut [Health], i: usize, policy: &OutlierPolicy, now: Instant) {
    if health[i].is_ejected(now) {
        return;
    }
    let ejected = health.iter().filter(|h| h.is_ejected(now)).count() as u64;
    if (ejected + 1) * 100 > u64::from(policy.max_ejection_percent) * health.len() as u64 {
        return;
    }
    let h = &mut health[i];
    // The backoff decays by one per interval spent un-ejected since the last ejection ended.
    if let Some(until) = h.ejected_until {
        let healthy = now.saturating_duration_since(until);
        let intervals = healthy.as_nanos() / policy.interval.as_nanos().max(1);
        h.ejections = h
            .ejections
            .saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
    }
    h.ejections = h.ejections.saturating_add(1);
    let cap = MAX_EJECTION_TIME.max(policy.base_ejection_time);
    let length = policy
        .base_ejection_time
        .checked_mul(h.ejections)
        .map_or(cap, |d| d.min(cap));
    h.ejected_until = Some(now + length);
}

fn acquire(counter: &Arc<AtomicU32>, limit: u32) -> Option<Permit> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()?;
    Some(Permit {
        counter: counter.clone(),
    })
}

fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    let d = Duration::new(u64::try_from(d.seconds).ok()?, u32::try_from(d.nanos).ok()?);
    Some(d).filter(|d| !d.is_zero())
}

fn pool_limits(pool: Option<&pb::ConnectionPool>) -> PoolLimits {
    let p = pool.cloned().unwrap_or_default();
    let limit = |v: u32| Some(v).filter(|v| *v > 0);
    PoolLimits {
        max_connections: limit(p.max_connections),
        max_pending_requests: limit(p.http1_max_pending_requests),
        max_requests: limit(p.http2_max_requests),
        max_requests_per_connection: limit(p.max_requests_per_connection),
        max_retries: limit(p.max_retries),
        connect_timeout: duration(p.connect_timeout.as_ref()).unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        idle_timeout: duration(p.idle_timeout.as_ref()).unwrap_or(DEFAULT_IDLE_TIMEOUT),
    }
}

/// `None` when neither threshold is set: nothing can eject.
fn outlier_policy(o: &pb::OutlierDetection) -> Option<OutlierPolicy> {
    if o.consecutive_5xx_errors == 0 && o.consecutive_gateway_errors == 0 {
        return None;
    }
    Some(OutlierPolicy {
        consecutive_5xx: o.consecutive_5xx_errors,
        consecutive_gateway: o.consecutive_gateway_errors,
        interval: duration(o.interval.as_ref()).unwrap_or(DEFAULT_INTERVAL),
        base_ejection_time: duration(o.base_ejection_time.as_ref())
            .unwrap_or(DEFAULT_BASE_EJECTION_TIME),
        max_ejection_percent: match o.max_ejection_percent {
            0 => DEFAULT_MAX_EJECTION_PERCENT,
            p => p.min(100),
        },
    })
}
