//! The Istio ambient tutorial, run against a sandbox: each step changes the cluster the way a user would
//! (`sandbox apply` of Istio YAML, a namespace label) and checks what a client pod sees, printing a row per
//! check as it goes: what was done, what was expected, what happened.
//!
//! Input: a sandbox that is up ([`Options`], its [`Model`]). Output: the table on the given writer, and
//! whether every check saw what it expected. Checks are calls from inside pod namespaces (the apps'
//! HTTP client) and, for mTLS, the destination proxy's Istio metrics; each waits up to [`SETTLE`] for the
//! cluster to converge (the agents and the control plane pick up changes within about a second).
//!
//! The last step is egress: the outside world's server (`api.example.test`, a namespace of its own off
//! node1) is called at a ServiceEntry's address from a pod in the mesh, first before the entry (the address
//! means nothing: no answer), then after it (the server's answer, and the caller's node proxy counting the
//! connection to that host as the source).
//!
//! With two networks (`--multi-network`) the same steps run unchanged (but for the ServiceEntry, whose
//! endpoint then names its network, `network1`; calls between productpage, ratings
//! and the waypoint on network1 and reviews on network2 cross through the east-west gateways); the output
//! first says which network each node is on.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::apply::Verb;
use super::apps::{self, Outcome};
use super::model::Model;
use super::{net, Error, Options};
use crate::netns::Netns;

/// How long a check waits for the expected outcome.
const SETTLE: Duration = Duration::from_secs(20);
/// Per-call timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A node proxy's metrics port, on the node's loopback.
const METRICS_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 15020);

/// The L4 `reviews-viewer` (a literal, so that manifests can be put together with `concat!`).
macro_rules! reviews_only_productpage {
    () => {
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/productpage
"
    };
}

/// The waypoint Gateway `istioctl waypoint apply -n default` writes (a literal, for `concat!`).
macro_rules! waypoint_gateway {
    () => {
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: default
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"
    };
}

/// PeerAuthentication STRICT for `default`, as in the tutorial.
pub const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: STRICT
";

/// `kubectl label namespace test istio.io/dataplane-mode=ambient`, as a manifest.
pub const TEST_INTO_MESH: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: test
  labels:
    istio.io/dataplane-mode: ambient
";

/// Only productpage's identity may reach reviews.
pub const REVIEWS_ONLY_PRODUCTPAGE: &str = reviews_only_productpage!();

/// `istioctl waypoint apply -n default --enroll-namespace`, as a manifest: the waypoint Gateway, and the
/// namespace told to use it.
pub const WAYPOINT: &str = concat!(
    waypoint_gateway!(),
    "---
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
    istio.io/use-waypoint: waypoint
"
);

/// `reviews-viewer` moved to the waypoint: the same rule, now bound to the reviews Service (what Istio's
/// docs do once a waypoint sees the callers' identities).
pub const REVIEWS_VIEWER_AT_WAYPOINT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-viewer
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: \"\"
    name: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/productpage
";

/// An L7 policy at the waypoint: `test/sleep` may GET productpage, nothing else.
pub const PRODUCTPAGE_VIEWER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: \"\"
    name: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/test/sa/sleep
    to:
    - operation:
        methods: [\"GET\"]
";

/// 80 % of reviews' requests to v1, 20 % to v2 (Istio's traffic-management step).
pub const REVIEWS_80_20: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: default
spec:
  parentRefs:
  - group: \"\"
    kind: Service
    name: reviews
    port: 9080
  rules:
  - backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 80
    - name: reviews-v2
      port: 9080
      weight: 20
";

/// The waypoint Gateway alone (`istioctl waypoint delete -n default waypoint`).
pub const WAYPOINT_GATEWAY: &str = waypoint_gateway!();

/// Back to L4 only: `default` without `use-waypoint`, and `reviews-viewer` enforced by reviews' proxy again.
pub const BACK_TO_L4: &str = concat!(
    "apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
---
",
    reviews_only_productpage!()
);

/// The address the ServiceEntry gives `api.example.test` (from 240.240.0.0/16, where Istio allocates
/// ServiceEntry addresses itself): before the entry it means nothing.
const EGRESS_VIP: [u8; 4] = [240, 240, 0, 10];

/// `api.example.test` as an Istio user declares an external API: a VIP, port 80, its one endpoint the
/// outside world's server (192.0.2.10, [`super::model::Outside`]).
pub const API_SERVICE_ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: api-example
  namespace: default
spec:
  hosts:
  - api.example.test
  addresses:
  - 240.240.0.10
  ports:
  - number: 80
    name: http
    protocol: HTTP
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - address: 192.0.2.10
";

/// [`API_SERVICE_ENTRY`] in a multi-network mesh: the endpoint names the network it is reached from
/// (the outside world hangs off node1, on `network1`), as Istio's multi-network ServiceEntries do; without
/// it the endpoint would be on no network and the node proxy would look for a gateway to it.
pub const API_SERVICE_ENTRY_NETWORK1: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: api-example
  namespace: default
spec:
  hosts:
  - api.example.test
  addresses:
  - 240.240.0.10
  ports:
  - number: 80
    name: http
    protocol: HTTP
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - address: 192.0.2.10
    network: network1
";

/// The waypoint's identity, as destination proxies count it.
const WAYPOINT_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/waypoint";

/// What a check expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// An HTTP 200.
    Answered,
    /// An HTTP 200, and the destination's proxy counted the caller's identity over mutual TLS.
    AnsweredMtls,
    /// No answer: reset, or closed without a response (how a denial looks to the caller).
    Denied,
    /// An HTTP 200 that went through the waypoint: the destination's proxy counted the waypoint's
    /// identity over mutual TLS.
    ViaWaypoint,
    /// HTTP 403 `RBAC: access denied`: the waypoint's L7 policy refused the request.
    Forbidden,
    /// HTTP 503: the waypoint could not reach the destination (here: its proxy refused the waypoint).
    Unavailable,
    /// No HTTP answer at all (the address leads nowhere).
    Unanswered,
    /// An HTTP 200 from the outside world's server, and the caller's node proxy counted the connection
    /// to its host as the source (`reporter="source"`, `destination_service`).
    FromOutside,
}

impl Expect {
    fn label(self) -> &'static str {
        match self {
            Expect::Answered => "answered",
            Expect::AnsweredMtls => "answered, mTLS",
            Expect::Denied => "refused",
            Expect::ViaWaypoint => "via waypoint",
            Expect::Forbidden => "HTTP 403",
            Expect::Unavailable => "HTTP 503",
            Expect::Unanswered => "not answered",
            Expect::FromOutside => "outside world",
        }
    }
}

/// The table's column widths.
const W_STEP: usize = 3;
const W_ACTION: usize = 52;
const W_EXPECT: usize = 15;

struct Table<'a> {
    out: &'a mut dyn Write,
    passed: usize,
    failed: usize,
}

impl Table<'_> {
    fn header(&mut self) {
        let _ = writeln!(
            self.out,
            "\n{:<W_STEP$} {:<W_ACTION$} {:<W_EXPECT$} {:<8} OBSERVED",
            "#", "STEP", "EXPECTED", "RESULT"
        );
    }

    fn action(&mut self, n: &str, what: &str, result: &str) {
        let _ = writeln!(
            self.out,
            "{n:<W_STEP$} {what:<W_ACTION$} {:<W_EXPECT$} {result}",
            ""
        );
    }

    fn start(&mut self, n: &str, what: &str, expect: Expect) {
        let _ = write!(
            self.out,
            "{n:<W_STEP$} {what:<W_ACTION$} {:<W_EXPECT$} ",
            expect.label()
        );
        let _ = self.out.flush();
    }

    fn finish(&mut self, ok: bool, observed: &str, took: Duration) {
        let verdict = if ok { "ok" } else { "MISMATCH" };
        let _ = writeln!(
            self.out,
            "{verdict:<8} {observed} ({:.1} s)",
            took.as_secs_f64()
        );
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// One step of the tutorial: a change as a user makes it, or a call and what it should see.
enum Step {
    /// A heading that changes nothing.
    Note { n: &'static str, what: &'static str },
    /// `sandbox apply` of a manifest.
    Apply {
        n: &'static str,
        what: &'static str,
        manifest: &'static str,
    },
    /// `sandbox apply` of the manifest for the sandbox's layout (one network, or two).
    ApplyPerLayout {
        n: &'static str,
        what: &'static str,
        one_network: &'static str,
        two_networks: &'static str,
    },
    /// `sandbox delete` of a manifest.
    Delete {
        n: &'static str,
        what: &'static str,
        manifest: &'static str,
    },
    /// A call from a pod to a service path.
    Check {
        from: &'static str,
        method: &'static str,
        service: &'static str,
        path: &'static str,
        expect: Expect,
    },
    /// A GET of `/` from a pod to the ServiceEntry's address ([`EGRESS_VIP`]), port 80.
    Egress { from: &'static str, expect: Expect },
    /// `calls` calls from a pod to a service; the apps that answer must be split as `weights` say
    /// (percent), within what chance allows for that many calls.
    Split {
        from: &'static str,
        service: &'static str,
        path: &'static str,
        calls: u32,
        weights: &'static [(&'static str, u32)],
    },
}

/// A GET check.
const fn get(
    from: &'static str,
    service: &'static str,
    path: &'static str,
    expect: Expect,
) -> Step {
    Step::Check {
        from,
        method: "GET",
        service,
        path,
        expect,
    }
}

/// The Istio ambient tutorial's L4 part.
const TUTORIAL: &[Step] = &[
    Step::Note {
        n: "1",
        what: "test is not in the mesh; default is (ambient)",
    },
    get(
        "test/sleep",
        "productpage",
        "/productpage",
        Expect::Answered,
    ),
    Step::Apply {
        n: "2",
        what: "apply PeerAuthentication default/default: STRICT",
        manifest: STRICT,
    },
    get("test/sleep", "productpage", "/productpage", Expect::Denied),
    Step::Apply {
        n: "3",
        what: "label namespace test istio.io/dataplane-mode=ambient",
        manifest: TEST_INTO_MESH,
    },
    get(
        "test/sleep",
        "productpage",
        "/productpage",
        Expect::AnsweredMtls,
    ),
    Step::Apply {
        n: "4",
        what: "apply AuthorizationPolicy default/reviews-viewer",
        manifest: REVIEWS_ONLY_PRODUCTPAGE,
    },
    get(
        "default/productpage",
        "reviews",
        "/reviews/0",
        Expect::Answered,
    ),
    get("test/sleep", "reviews", "/reviews/0", Expect::Denied),
    get(
        "test/sleep",
        "productpage",
        "/productpage",
        Expect::Answered,
    ),
    // The L7 part: a waypoint for `default`.
    Step::Apply {
        n: "5",
        what: "deploy waypoint default/waypoint; default uses it",
        manifest: WAYPOINT,
    },
    get(
        "test/sleep",
        "productpage",
        "/productpage",
        Expect::ViaWaypoint,
    ),
    // reviews-viewer is still L4: reviews' proxy now sees the waypoint's identity, not productpage's.
    get(
        "default/productpage",
        "reviews",
        "/reviews/0",
        Expect::Unavailable,
    ),
    Step::Apply {
        n: "6",
        what: "move reviews-viewer to the waypoint (targetRefs)",
        manifest: REVIEWS_VIEWER_AT_WAYPOINT,
    },
    get(
        "default/productpage",
        "reviews",
        "/reviews/0",
        Expect::ViaWaypoint,
    ),
    get("test/sleep", "reviews", "/reviews/0", Expect::Forbidden),
    Step::Apply {
        n: "7",
        what: "apply L7 AuthorizationPolicy productpage-viewer (GET)",
        manifest: PRODUCTPAGE_VIEWER,
    },
    get(
        "test/sleep",
        "productpage",
        "/productpage",
        Expect::Answered,
    ),
    Step::Check {
        from: "test/sleep",
        method: "POST",
        service: "productpage",
        path: "/productpage",
        expect: Expect::Forbidden,
    },
    Step::Apply {
        n: "8",
        what: "apply HTTPRoute reviews: v1 80 %, v2 20 %",
        manifest: REVIEWS_80_20,
    },
    Step::Split {
        from: "default/productpage",
        service: "reviews",
        path: "/reviews/0",
        calls: 200,
        weights: &[("reviews-v1", 80), ("reviews-v2", 20)],
    },
    Step::Apply {
        n: "9",
        what: "unlabel use-waypoint; reviews-viewer back to L4",
        manifest: BACK_TO_L4,
    },
    Step::Delete {
        n: "",
        what: "delete waypoint default/waypoint",
        manifest: WAYPOINT_GATEWAY,
    },
    get(
        "default/productpage",
        "reviews",
        "/reviews/0",
        Expect::AnsweredMtls,
    ),
    get("test/sleep", "reviews", "/reviews/0", Expect::Denied),
    // Egress: an external API declared by a ServiceEntry, served by the outside world's server.
    Step::Note {
        n: "10",
        what: "egress: api.example.test (outside, 192.0.2.10)",
    },
    Step::Egress {
        from: "test/sleep",
        expect: Expect::Unanswered,
    },
    Step::ApplyPerLayout {
        n: "",
        what: "apply ServiceEntry default/api-example (VIP)",
        one_network: API_SERVICE_ENTRY,
        two_networks: API_SERVICE_ENTRY_NETWORK1,
    },
    Step::Egress {
        from: "test/sleep",
        expect: Expect::FromOutside,
    },
];

/// Runs the tutorial's steps against the sandbox that is up. Returns whether every check matched.
pub fn steps(opts: &Options, out: &mut dyn Write, stop: &AtomicBool) -> Result<bool, Error> {
    let mut model = super::require(opts)?;
    let mut t = Table {
        out,
        passed: 0,
        failed: 0,
    };
    t.header();
    for step in TUTORIAL {
        match *step {
            Step::Note { n, what } => t.action(n, what, ""),
            Step::Apply { n, what, manifest }
            | Step::Delete { n, what, manifest }
            | Step::ApplyPerLayout {
                n,
                what,
                one_network: manifest,
                ..
            } => {
                let verb = match step {
                    Step::Delete { .. } => Verb::Delete,
                    _ => Verb::Apply,
                };
                let manifest = match step {
                    Step::ApplyPerLayout { two_networks, .. } if model.multi_network() => {
                        two_networks
                    }
                    _ => manifest,
                };
                let (next, lines) = super::apply_text(opts, manifest, what, verb)?;
                model = next;
                // One row per object changed (kubectl's lines), the first beside the step.
                let mut lines = lines.iter();
                t.action(n, what, lines.next().map_or("", String::as_str));
                for more in lines {
                    t.action("", "", more);
                }
            }
            Step::Check {
                from,
                method,
                service,
                path,
                expect,
            } => check(&mut t, &model, from, (method, service, path), expect, stop)?,
            Step::Split {
                from,
                service,
                path,
                calls,
                weights,
            } => split(&mut t, &model, from, (service, path), calls, weights, stop)?,
            Step::Egress { from, expect } => egress(&mut t, &model, from, expect, stop)?,
        }
    }
    let _ = writeln!(
        t.out,
        "\n{} of {} checks as expected{}",
        t.passed,
        t.passed + t.failed,
        if t.failed == 0 {
            ""
        } else {
            " — see the logs of the components involved"
        }
    );
    Ok(t.failed == 0)
}

/// Calls `service` from `from` until the outcome matches `expect` or [`SETTLE`] passes; prints the row.
fn check(
    t: &mut Table<'_>,
    model: &Model,
    from: &str,
    (method, service, path): (&'static str, &str, &'static str),
    expect: Expect,
    stop: &AtomicBool,
) -> Result<(), Error> {
    if stop.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    let (pod, svc) = caller_and_service(model, from, service)?;
    let dst = SocketAddr::new(svc.vip.into(), svc.port);
    let verb = if method == "GET" {
        String::new()
    } else {
        format!("{method} ")
    };
    let what = format!("  {} → {verb}{service}:{}{path}", pod.key(), svc.port);
    t.start("", &what, expect);
    let ns = net::open(&net::pod_netns(model, &pod))?;
    // The destination proxy runs on the node of the service's (first) pod.
    let dst_node = model
        .endpoints(svc)
        .next()
        .map_or(&model.nodes[0].name, |p| &p.node);
    let dst_node = net::open(&net::node_netns(model, dst_node))?;
    // Who the destination's proxy should see: the caller, or the waypoint in between.
    let principal = match expect {
        Expect::ViaWaypoint => WAYPOINT_PRINCIPAL.to_string(),
        _ => format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            pod.namespace, pod.service_account
        ),
    };
    let started = Instant::now();
    let baseline = mtls_count(&dst_node, &principal);
    loop {
        let outcome = ns
            .run_on_thread(move || apps::call_blocking(dst, method, path, CALL_TIMEOUT))
            .unwrap_or_else(|e| Outcome::Failed(e.to_string()));
        let (ok, observed) = judge(
            &outcome,
            expect,
            || mtls_count(&dst_node, &principal) > baseline,
            &principal,
        );
        if stop.load(Ordering::Relaxed) {
            let _ = writeln!(t.out, "interrupted");
            return Err(Error::Interrupted);
        }
        if ok || started.elapsed() > SETTLE {
            t.finish(ok, &observed, started.elapsed());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Calls the ServiceEntry's address from `from` until the outcome matches `expect` or [`SETTLE`] passes;
/// prints the row.
fn egress(
    t: &mut Table<'_>,
    model: &Model,
    from: &str,
    expect: Expect,
    stop: &AtomicBool,
) -> Result<(), Error> {
    if stop.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    let pod = model.find_pod(from).map_err(Error::Refused)?.clone();
    let dst = SocketAddr::from((EGRESS_VIP, super::model::OUTSIDE_PORT));
    t.start("", &format!("  {} → {dst}/", pod.key()), expect);
    let ns = net::open(&net::pod_netns(model, &pod))?;
    let src_node = net::open(&net::node_netns(model, &pod.node))?;
    let host = super::model::OUTSIDE_HOST;
    let started = Instant::now();
    let baseline = source_count(&src_node, host);
    loop {
        let outcome = ns
            .run_on_thread(move || apps::get(dst, "/", CALL_TIMEOUT))
            .unwrap_or_else(|e| Outcome::Failed(e.to_string()));
        let (ok, observed) = match (&outcome, expect) {
            (Outcome::Answered { .. }, Expect::Unanswered) => (false, describe(&outcome)),
            (_, Expect::Unanswered) => (true, outcome.to_string()),
            (
                Outcome::Answered {
                    status: 200,
                    app: Some(app),
                    body,
                },
                _,
            ) if app == "external" => {
                let mut lines = body.lines();
                let hello = lines.next().unwrap_or_default();
                let client = lines.next().unwrap_or_default();
                let counted = source_count(&src_node, host).saturating_sub(baseline);
                let ok = hello == format!("hello from {host}") && counted > 0;
                (
                    ok,
                    format!(
                        "HTTP 200 {hello:?} ({client}); {} counted {counted} to {host}",
                        pod.node
                    ),
                )
            }
            _ => (false, describe(&outcome)),
        };
        if stop.load(Ordering::Relaxed) {
            let _ = writeln!(t.out, "interrupted");
            return Err(Error::Interrupted);
        }
        if ok || started.elapsed() > SETTLE {
            t.finish(ok, &observed, started.elapsed());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Connections the proxy in `node` counted as the source to the service `host` (its `/metrics`).
fn source_count(node: &Arc<Netns>, host: &str) -> u64 {
    let want = format!("destination_service=\"{host}\"");
    let metrics =
        match node.run_on_thread(|| apps::get(METRICS_ADDR.into(), "/metrics", CALL_TIMEOUT)) {
            Ok(Outcome::Answered { body, .. }) => body,
            _ => return 0,
        };
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains(&want)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn caller_and_service<'a>(
    model: &'a Model,
    from: &str,
    service: &str,
) -> Result<(super::model::Pod, &'a super::model::Service), Error> {
    let pod = model.find_pod(from).map_err(Error::Refused)?.clone();
    let svc = model
        .find_service(service)
        .ok_or_else(|| Error::Refused(format!("no service {service}")))?;
    Ok((pod, svc))
}

/// Calls `service` `calls` times from `from` and counts which app answered each; matches when every call
/// was answered by an app of `weights` in about those proportions. Repeats until it matches or [`SETTLE`]
/// passes (a route takes a moment to reach the waypoint).
fn split(
    t: &mut Table<'_>,
    model: &Model,
    from: &str,
    (service, path): (&str, &'static str),
    calls: u32,
    weights: &[(&str, u32)],
    stop: &AtomicBool,
) -> Result<(), Error> {
    let (pod, svc) = caller_and_service(model, from, service)?;
    let dst = SocketAddr::new(svc.vip.into(), svc.port);
    // `v1 80%, v2 20%` for apps named `reviews-v1`, `reviews-v2`.
    let prefix = format!("{service}-");
    let want: Vec<String> = weights
        .iter()
        .map(|(a, w)| format!("{} {w}%", a.strip_prefix(&prefix).unwrap_or(a)))
        .collect();
    let what = format!("  {} → {service}:{}{path} ×{calls}", pod.key(), svc.port);
    // Each call stands alone (a new connection), as the tutorial's curl loop does.
    let _ = write!(
        t.out,
        "{:<W_STEP$} {what:<W_ACTION$} {:<W_EXPECT$} ",
        "",
        want.join(", ")
    );
    let _ = t.out.flush();
    let ns = net::open(&net::pod_netns(model, &pod))?;
    let started = Instant::now();
    loop {
        let mut answered: std::collections::BTreeMap<String, u32> = Default::default();
        for _ in 0..calls {
            if stop.load(Ordering::Relaxed) {
                let _ = writeln!(t.out, "interrupted");
                return Err(Error::Interrupted);
            }
            let outcome = ns
                .run_on_thread(move || apps::get(dst, path, CALL_TIMEOUT))
                .unwrap_or_else(|e| Outcome::Failed(e.to_string()));
            let key = match outcome {
                Outcome::Answered {
                    status: 200,
                    app: Some(app),
                    ..
                } => app,
                other => other.to_string(),
            };
            *answered.entry(key).or_default() += 1;
        }
        let ok = split_matches(&answered, calls, weights);
        if ok || started.elapsed() > SETTLE {
            let observed: Vec<String> = answered.iter().map(|(a, n)| format!("{a} {n}")).collect();
            t.finish(ok, &observed.join(", "), started.elapsed());
            return Ok(());
        }
    }
}

/// Whether counts of `calls` answers fit `weights` (percent): only those apps answered, each within 4.5
/// standard deviations of its expected count (a true split fails this about once in 100 000 runs; for 200
/// calls, 80/20 and 50/50 are 10 deviations apart).
fn split_matches(
    answered: &std::collections::BTreeMap<String, u32>,
    calls: u32,
    weights: &[(&str, u32)],
) -> bool {
    let total: u32 = weights.iter().map(|(_, w)| w).sum();
    let known = answered.keys().all(|a| weights.iter().any(|(w, _)| w == a));
    known
        && weights.iter().all(|(app, w)| {
            let p = f64::from(*w) / f64::from(total);
            let n = f64::from(calls);
            let got = f64::from(answered.get(*app).copied().unwrap_or(0));
            (got - n * p).abs() <= 4.5 * (n * p * (1.0 - p)).sqrt() + 1.0
        })
}

fn judge(
    outcome: &Outcome,
    expect: Expect,
    mtls_seen: impl FnOnce() -> bool,
    principal: &str,
) -> (bool, String) {
    let status = match outcome {
        Outcome::Answered { status, .. } => Some(*status),
        _ => None,
    };
    let answered = status == Some(200);
    let mut observed = describe(outcome);
    let ok = match expect {
        Expect::Answered => answered,
        Expect::Denied => matches!(outcome, Outcome::Reset | Outcome::Closed),
        Expect::Forbidden => {
            matches!(outcome, Outcome::Answered { status: 403, body, .. } if body == "RBAC: access denied")
        }
        Expect::Unavailable => status == Some(503),
        Expect::Unanswered => !matches!(outcome, Outcome::Answered { .. }),
        Expect::FromOutside => answered && outcome_app(outcome) == Some("external"),
        Expect::AnsweredMtls | Expect::ViaWaypoint => {
            let mtls = answered && mtls_seen();
            if mtls {
                observed += &format!("; mutual_tls from {principal}");
            } else if answered {
                observed += &format!("; no mTLS connection from {principal} counted");
            }
            mtls
        }
    };
    (ok, observed)
}

fn outcome_app(outcome: &Outcome) -> Option<&str> {
    match outcome {
        Outcome::Answered { app, .. } => app.as_deref(),
        _ => None,
    }
}

/// One line for an outcome; for productpage's page, what it got from its own upstreams
/// (`HTTP 200 from productpage: details ok, reviews-v2 ok`).
fn describe(outcome: &Outcome) -> String {
    let Outcome::Answered { status, app, body } = outcome else {
        return outcome.to_string();
    };
    let Some(from) = app.as_deref() else {
        // Not an app's answer: the waypoint's own (403 `RBAC: access denied`, 503 ...).
        let first = body.lines().next().unwrap_or_default();
        let mut short: String = first.chars().take(40).collect();
        if short.len() < first.len() {
            short.push('…');
        }
        return format!("HTTP {status} {short:?}");
    };
    let upstreams: Vec<String> = body
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(": ")?;
            if name != "details" && name != "reviews" {
                return None;
            }
            Some(match rest.strip_prefix("ok (") {
                // `reviews: ok (reviews-v2, ratings: black stars)` names the version that answered.
                Some(detail) if name == "reviews" => {
                    format!("{} ok", detail.split([',', ')']).next().unwrap_or(name))
                }
                Some(_) => format!("{name} ok"),
                None => format!("{name} unavailable"),
            })
        })
        .collect();
    if upstreams.is_empty() {
        format!("HTTP {status} from {from}")
    } else {
        format!("HTTP {status} from {from}: {}", upstreams.join(", "))
    }
}

/// Connections the proxy in `node` counted as the destination, over mutual TLS, from `principal` (read
/// from its `/metrics` on the node's loopback).
fn mtls_count(node: &Arc<Netns>, principal: &str) -> u64 {
    let want = format!("source_principal=\"{principal}\"");
    let metrics =
        match node.run_on_thread(|| apps::get(METRICS_ADDR.into(), "/metrics", CALL_TIMEOUT)) {
            Ok(Outcome::Answered { body, .. }) => body,
            _ => return 0,
        };
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains(&want)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Which network each node is on and where its east-west gateway is (nothing with one network).
fn write_networks(out: &mut dyn Write, model: &Model) {
    if !model.multi_network() {
        return;
    }
    for n in &model.nodes {
        let gateway = match model.east_west_gateway_of(&n.name) {
            Some(p) => format!(
                "east-west gateway {} at {}:{}",
                p.key(),
                p.ip,
                super::model::GATEWAY_HBONE_PORT
            ),
            None => "no east-west gateway".to_string(),
        };
        let _ = writeln!(
            out,
            "  {}: network {} ({}), {gateway}",
            n.name,
            n.network.as_deref().unwrap_or(""),
            n.pod_cidr
        );
    }
}

/// `meshnode sandbox`: up (in `layout`), the tutorial's steps, down (unless `keep`). Returns whether every
/// check matched.
pub fn run(
    opts: &Options,
    keep: bool,
    layout: super::Layout,
    out: &mut dyn Write,
    stop: &AtomicBool,
) -> Result<bool, Error> {
    let nodes = match layout {
        super::Layout::OneNetwork => "two nodes",
        super::Layout::TwoNetworks => "two nodes on two networks (an east-west gateway each)",
    };
    let _ = writeln!(
        out,
        "meshnode sandbox {:?}: {nodes}, the embedded control plane and bookinfo, in network namespaces\n",
        opts.name
    );
    let started = Instant::now();
    let model = super::up(opts, layout, out)?;
    let _ = writeln!(
        out,
        "  cluster up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    write_networks(out, &model);
    let result = match steps(opts, out, stop) {
        Err(Error::Interrupted) => Ok(false),
        other => other,
    };
    if keep {
        let _ = writeln!(
            out,
            "\nleft running (--keep): try `meshnode sandbox exec sleep -- curl -s http://productpage:9080/productpage`; remove with `meshnode sandbox down`"
        );
    } else {
        let _ = writeln!(out, "\nremoving the sandbox");
        super::down(opts, out)?;
    }
    result
}
