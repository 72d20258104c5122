//! Tests for endpoint choice: load balancing, retries avoiding the previous endpoint, outlier ejection
//! (thresholds, backoff, decay, caps, max ejection percent, all ejected), and pool admission.

use std::collections::HashMap;

use super::*;

const SEED: u64 = 0x5eed;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn pb_duration(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

fn cluster(endpoints: &[&str]) -> pb::Cluster {
    pb::Cluster {
        name: "outbound|9080|v1|reviews.default.svc.cluster.local".into(),
        service_hostname: "reviews.default.svc.cluster.local".into(),
        port: 9080,
        subset: "v1".into(),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        ..Default::default()
    }
}

fn with_lb(mut c: pb::Cluster, simple: pb::load_balancer::Simple) -> pb::Cluster {
    c.load_balancer = Some(pb::LoadBalancer {
        simple: simple as i32,
    });
    c
}

/// Outlier detection on 5xx (`consecutive_5xx`) with a 30 s base ejection time.
fn with_outlier(
    mut c: pb::Cluster,
    consecutive_5xx: u32,
    gateway: u32,
    max_percent: u32,
) -> pb::Cluster {
    c.outlier_detection = Some(pb::OutlierDetection {
        consecutive_5xx_errors: consecutive_5xx,
        consecutive_gateway_errors: gateway,
        interval: pb_duration(secs(10)),
        base_ejection_time: pb_duration(secs(30)),
        max_ejection_percent: max_percent,
    });
    c
}

fn with_pool(mut c: pb::Cluster, pool: pb::ConnectionPool) -> pb::Cluster {
    c.connection_pool = Some(pool);
    c
}

fn endpoints(c: &pb::Cluster) -> Endpoints {
    Endpoints::with_seed(c, SEED)
}

/// How many of `n` picks went to each endpoint.
fn spread(e: &Endpoints, now: Instant, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let k = e.pick(now, None).expect("an endpoint");
        *counts.entry(k.to_owned()).or_insert(0) += 1;
    }
    counts
}

fn fail(e: &Endpoints, endpoint: &str, outcome: Outcome, times: usize, now: Instant) {
    for _ in 0..times {
        e.record(endpoint, outcome, now);
    }
}

#[test]
fn endpoints_are_shared_between_worker_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Endpoints>();
    send_sync::<Permit>();
    send_sync::<Active>();
}

#[test]
fn a_cluster_without_endpoints_has_nothing_to_pick() {
    let e = endpoints(&cluster(&[]));
    assert!(e.is_empty());
    assert_eq!(e.pick(Instant::now(), None), None);
    assert_eq!(e.pick(Instant::now(), Some("a")), None);
}

#[test]
fn duplicate_endpoints_count_once() {
    let e = endpoints(&cluster(&["a", "b", "a"]));
    assert_eq!(e.keys().collect::<Vec<_>>(), ["a", "b"]);
}

#[test]
fn round_robin_takes_every_endpoint_in_turn() {
    let e = endpoints(&cluster(&["a", "b", "c"]));
    assert_eq!(e.lb(), Lb::RoundRobin);
    let now = Instant::now();
    let picks: Vec<&str> = (0..6)
        .map(|_| e.pick(now, None).expect("endpoint"))
        .collect();
    assert_eq!(picks[..3], picks[3..], "a cycle of three");
    let mut first = picks[..3].to_vec();
    first.sort_unstable();
    assert_eq!(first, ["a", "b", "c"]);
}

#[test]
fn passthrough_is_balanced_round_robin() {
    let e = endpoints(&with_lb(
        cluster(&["a", "b"]),
        pb::load_balancer::Simple::Passthrough,
    ));
    assert_eq!(e.lb(), Lb::RoundRobin);
}

#[test]
fn random_spreads_requests_over_every_endpoint() {
    let e = endpoints(&with_lb(
        cluster(&["a", "b", "c"]),
        pb::load_balancer::Simple::Random,
    ));
    let counts = spread(&e, Instant::now(), 3000);
    for k in ["a", "b", "c"] {
        let n = counts.get(k).copied().unwrap_or_default();
        assert!((800..=1200).contains(&n), "{k}: {n} of 3000");
    }
}

#[test]
fn least_request_prefers_the_less_busy_endpoint() {
    let e = endpoints(&with_lb(
        cluster(&["busy", "idle"]),
        pb::load_balancer::Simple::LeastRequest,
    ));
    let _held: Vec<Active> = (0..5).map(|_| e.begin("busy").expect("known")).collect();
    let counts = spread(&e, Instant::now(), 1000);
    // Power of two choices: "busy" only when both draws are "busy" (one time in four).
    let busy = counts.get("busy").copied().unwrap_or_default();
    assert!((150..=350).contains(&busy), "busy got {busy} of 1000");
    drop(_held);
    let counts = spread(&e, Instant::now(), 1000);
    let busy = counts.get("busy").copied().unwrap_or_default();
    assert!((400..=600).contains(&busy), "once idle, about even: {busy}");
    assert!(e.begin("unknown").is_none());
}

#[test]
fn a_retry_avoids_the_endpoint_it_tried_unless_it_is_the_only_one() {
    let now = Instant::now();
    for lb in [
        pb::load_balancer::Simple::RoundRobin,
        pb::load_balancer::Simple::Random,
        pb::load_balancer::Simple::LeastRequest,
    ] {
        let e = endpoints(&with_lb(cluster(&["a", "b", "c"]), lb));
        for _ in 0..50 {
            assert_ne!(e.pick(now, Some("b")), Some("b"), "{lb:?}");
        }
        let single = endpoints(&with_lb(cluster(&["a"]), lb));
        assert_eq!(single.pick(now, Some("a")), Some("a"), "{lb:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Outlier detection.

#[test]
fn five_consecutive_503s_eject_the_endpoint_for_the_base_time() {
    let e = endpoints(&with_outlier(cluster(&["a", "b"]), 5, 0, 100));
    let t0 = Instant::now();
    fail(&e, "a", Outcome::Status(503), 4, t0);
    assert!(!e.is_ejected("a", t0), "four are not enough");
    e.record("a", Outcome::Status(503), t0);
    assert!(e.is_ejected("a", t0));
    assert!((0..10).all(|_| e.pick(t0, None) == Some("b")));
    assert!(e.is_ejected("a", t0 + secs(29)));
    assert!(
        !e.is_ejected("a", t0 + secs(30)),
        "back after base_ejection_time"
    );
    let back = spread(&e, t0 + secs(30), 10);
    assert_eq!(back.get("a"), Some(&5));
}

#[test]
fn a_success_between_errors_restarts_the_count() {
    let e = endpoints(&with_outlier(cluster(&["a", "b"]), 3, 0, 100));
    let now = Instant::now();
    fail(&e, "a", Outcome::Status(500), 2, now);
    e.record("a", Outcome::Success, now);
    fail(&e, "a", Outcome::Status(500), 2, now);
    e.record("a", Outcome::Status(404), now);
    fail(&e, "a", Outcome::Status(500), 2, now);
    assert!(!e.is_ejected("a", now));
    e.record("a", Outcome::Status(500), now);
    assert!(e.is_ejected("a", now));
}

#[test]
fn connect_failures_and_resets_count_as_5xx() {
    let e = endpoints(&with_outlier(cluster(&["a", "b"]), 3, 0, 100));
    let now = Instant::now();
    e.record("a", Outcome::ConnectFailure, now);
    e.record("a", Outcome::Reset, now);
    e.record("a", Outcome::Status(500), now);
    assert!(e.is_ejected("a", now));
}

#[test]
fn gateway_errors_count_502_503_504_and_connect_failures_but_a_500_restarts_them() {
    let e = endpoints(&with_outlier(cluster(&["a", "b"]), 0, 3, 100));
    let now = Instant::now();
    e.record("a", Outcome::Status(502), now);
    e.record("a", Outcome::Status(504), now);
    e.record("a", Outcome::Status(500), now);
    e.record("a", Outcome::Status(503), now);
    e.record("a", Outcome::ConnectFailure, now);
    assert!(
        !e.is_ejected("a", now),
        "the 500 restarted the gateway count"
    );
    e.record("a", Outcome::Reset, now);
    assert!(e.is_ejected("a", now));
    // With only the gateway threshold set, 500s never eject.
    fail(&e, "b", Outcome::Status(500), 20, now);
    assert!(!e.is_ejected("b", now));
}

#[test]
fn each_ejection_in_a_row_lasts_longer_and_healthy_intervals_shorten_it_again() {
    let e = endpoints(&with_outlier(cluster(&["a", "b"]), 1, 0, 100));
    let t0 = Instant::now();
    e.record("a", Outcome::Status(500), t0);
    assert!(!e.is_ejected("a", t0 + secs(30)), "first: 30 s");
    let t1 = t0 + secs(30);
    e.record("a", Outcome::Status(500), t1);
    assert!(e.is_ejected("a", t1 + secs(59)), "second in a row: 60 s");
    assert!(!e.is_ejected("a", t1 + secs(60)));
    // Three healthy intervals (10 s each) after the second ejection ended take the count from 2 to 0.
    let t2 = t1 + secs(60) + secs(30);
    e.record("a", Outcome::Status(500), t2);
    assert!(!e.is_ejected("a", t2 + secs(30)), "decayed: 30 s again");
}

#[test]
fn ejections_never_last_longer_than_max_ejection_time() {
    let e = endpoints(&with_outlier(cluster(&["a", "b"]), 1, 0, 100));
    let mut now = Instant::now();
    for _ in 0..20 {
        e.record("a", Outcome::Status(500), now);
        assert!(e.is_ejected("a", now));
        // Find the end: never past 300 s.
        assert!(!e.is_ejected("a", now + MAX_EJECTION_TIME));
        now += MAX_EJECTION_TIME;
    }
}

#[test]
fn max_ejection_percent_keeps_the_rest_of_the_cluster_in_service() {
    let ten: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    let names: Vec<&str> = ten.iter().map(String::as_str).collect();
    let e = endpoints(&with_outlier(cluster(&names), 1, 0, 20));
    let now = Instant::now();
    for n in &names {
        e.record(n, Outcome::Status(500), now);
    }
    let ejected = names.iter().filter(|n| e.is_ejected(n, now)).count();
    assert_eq!(ejected, 2, "20 % of 10");
}

#[test]
fn with_the_default_ten_percent_a_small_cluster_never_ejects() {
    let e = endpoints(&with_outlier(cluster(&["a", "b", "c"]), 1, 0, 0));
    assert_eq!(e.outlier().map(|o| o.max_ejection_percent), Some(10));
    let now = Instant::now();
    fail(&e, "a", Outcome::Status(503), 10, now);
    assert!(!e.is_ejected("a", now));
}

#[test]
fn when_every_endpoint_is_ejected_there_is_no_healthy_upstream() {
    let e = endpoints(&with_outlier(cluster(&["only"]), 2, 0, 100));
    let now = Instant::now();
    fail(&e, "only", Outcome::Status(503), 2, now);
    assert_eq!(e.pick(now, None), None);
    assert_eq!(e.pick(now, Some("only")), None);
    assert_eq!(e.pick(now + secs(30), None), Some("only"));
}

#[test]
fn a_retry_goes_to_the_tried_endpoint_when_the_others_are_ejected() {
    let e = endpoints(&with_outlier(cluster(&["a", "b"]), 1, 0, 100));
    let now = Instant::now();
    e.record("b", Outcome::Status(500), now);
    assert_eq!(e.pick(now, Some("a")), Some("a"));
}

#[test]
fn without_outlier_detection_errors_never_eject() {
    let e = endpoints(&cluster(&["a"]));
    let now = Instant::now();
    fail(&e, "a", Outcome::Status(503), 100, now);
    assert_eq!(e.pick(now, None), Some("a"));
    // A policy with both thresholds zero is none at all.
    let zero = endpoints(&with_outlier(cluster(&["a"]), 0, 0, 100));
    assert!(zero.outlier().is_none());
    e.record("unknown", Outcome::Status(503), now);
}

// ---------------------------------------------------------------------------------------------
// Connection pool.

#[test]
fn without_pool_limits_every_request_is_admitted() {
    let e = endpoints(&cluster(&["a"]));
    let permits: Vec<Permit> = (0..10_000).map(|_| e.admit().expect("unlimited")).collect();
    assert_eq!(e.in_flight(), 10_000);
    drop(permits);
    assert_eq!(e.in_flight(), 0);
    let limits = e.limits();
    assert_eq!(limits.max_connections, None);
    assert_eq!(limits.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(limits.idle_timeout, DEFAULT_IDLE_TIMEOUT);
}

#[test]
fn http2_max_requests_bounds_requests_in_flight_and_a_permit_frees_on_drop() {
    let e = endpoints(&with_pool(
        cluster(&["a"]),
        pb::ConnectionPool {
            http2_max_requests: 2,
            ..Default::default()
        },
    ));
    let first = e.admit().expect("1");
    let _second = e.admit().expect("2");
    assert!(e.admit().is_none(), "third overflows (503 UO)");
    assert!(e.admit_multiplexed().is_none());
    drop(first);
    assert!(e.admit().is_some());
}

#[test]
fn one_connection_with_one_pending_request_admits_two_requests() {
    // Istio's circuit-breaking task: maxConnections 1, http1MaxPendingRequests 1.
    let e = endpoints(&with_pool(
        cluster(&["a"]),
        pb::ConnectionPool {
            max_connections: 1,
            http1_max_pending_requests: 1,
            connect_timeout: pb_duration(Duration::from_millis(250)),
            idle_timeout: pb_duration(secs(5)),
            max_requests_per_connection: 1,
            ..Default::default()
        },
    ));
    let _a = e.admit().expect("on the connection");
    let _b = e.admit().expect("pending");
    assert!(e.admit().is_none());
    // HTTP/2 upstreams share the connection: only http2MaxRequests (unset) applies.
    assert!(e.admit_multiplexed().is_some());
    let limits = e.limits();
    assert_eq!(limits.max_connections, Some(1));
    assert_eq!(limits.max_requests_per_connection, Some(1));
    assert_eq!(limits.connect_timeout, Duration::from_millis(250));
    assert_eq!(limits.idle_timeout, secs(5));
}

#[test]
fn max_retries_bounds_retries_in_flight() {
    let e = endpoints(&with_pool(
        cluster(&["a"]),
        pb::ConnectionPool {
            max_retries: 1,
            ..Default::default()
        },
    ));
    let retry = e.admit_retry().expect("one retry");
    assert!(e.admit_retry().is_none());
    assert!(e.admit().is_some(), "requests are counted apart");
    drop(retry);
    assert!(e.admit_retry().is_some());
}
