//! The Istio ambient tutorial, run against a sandbox: each step changes the cluster the way a user would
//! (`sandbox apply` of Istio YAML, a namespace label) and checks what a client pod sees, printing a row per
//! check as it goes: what was done, what was expected, what happened.
//!
//! Input: a sandbox that is up ([`Options`], its [`Model`]). Output: the table on the given writer, and
//! whether every check saw what it expected. Checks are calls from inside pod namespaces (the apps'
//! HTTP client) and, for mTLS, the destination proxy's Istio metrics; each waits up to [`SETTLE`] for the
//! cluster to converge (the agents and the control plane pick up changes within about a second).

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
pub const REVIEWS_ONLY_PRODUCTPAGE: &str = "apiVersion: security.istio.io/v1
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
";

/// What a check expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// An HTTP 200.
    Answered,
    /// An HTTP 200, and the destination's proxy counted the caller's identity over mutual TLS.
    AnsweredMtls,
    /// No answer: reset, or closed without a response (how a denial looks to the caller).
    Denied,
}

impl Expect {
    fn label(self) -> &'static str {
        match self {
            Expect::Answered => "answered",
            Expect::AnsweredMtls => "answered, mTLS",
            Expect::Denied => "refused",
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
    /// A call from a pod to a service path.
    Check {
        from: &'static str,
        service: &'static str,
        path: &'static str,
        expect: Expect,
    },
}

/// The Istio ambient tutorial's L4 part.
const TUTORIAL: &[Step] = &[
    Step::Note {
        n: "1",
        what: "test is not in the mesh; default is (ambient)",
    },
    Step::Check {
        from: "test/sleep",
        service: "productpage",
        path: "/productpage",
        expect: Expect::Answered,
    },
    Step::Apply {
        n: "2",
        what: "apply PeerAuthentication default/default: STRICT",
        manifest: STRICT,
    },
    Step::Check {
        from: "test/sleep",
        service: "productpage",
        path: "/productpage",
        expect: Expect::Denied,
    },
    Step::Apply {
        n: "3",
        what: "label namespace test istio.io/dataplane-mode=ambient",
        manifest: TEST_INTO_MESH,
    },
    Step::Check {
        from: "test/sleep",
        service: "productpage",
        path: "/productpage",
        expect: Expect::AnsweredMtls,
    },
    Step::Apply {
        n: "4",
        what: "apply AuthorizationPolicy default/reviews-viewer",
        manifest: REVIEWS_ONLY_PRODUCTPAGE,
    },
    Step::Check {
        from: "default/productpage",
        service: "reviews",
        path: "/reviews/0",
        expect: Expect::Answered,
    },
    Step::Check {
        from: "test/sleep",
        service: "reviews",
        path: "/reviews/0",
        expect: Expect::Denied,
    },
    Step::Check {
        from: "test/sleep",
        service: "productpage",
        path: "/productpage",
        expect: Expect::Answered,
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
            Step::Apply { n, what, manifest } => {
                let (next, lines) = super::apply_text(opts, manifest, what, Verb::Apply)?;
                model = next;
                t.action(n, what, &lines.join("; "));
            }
            Step::Check {
                from,
                service,
                path,
                expect,
            } => check(&mut t, &model, from, (service, path), expect, stop)?,
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
    (service, path): (&str, &'static str),
    expect: Expect,
    stop: &AtomicBool,
) -> Result<(), Error> {
    if stop.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    let pod = model.find_pod(from).map_err(Error::Refused)?.clone();
    let svc = model
        .find_service(service)
        .ok_or_else(|| Error::Refused(format!("no service {service}")))?;
    let dst = SocketAddr::new(svc.vip.into(), svc.port);
    let what = format!("  {} → {service}:{}{path}", pod.key(), svc.port);
    t.start("", &what, expect);
    let ns = net::open(&net::pod_netns(model, &pod))?;
    // The destination proxy runs on the node of the service's (first) pod.
    let dst_node = model
        .endpoints(svc)
        .next()
        .map_or(&model.nodes[0].name, |p| &p.node);
    let dst_node = net::open(&net::node_netns(model, dst_node))?;
    let principal = format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        pod.namespace, pod.service_account
    );
    let started = Instant::now();
    let baseline = mtls_count(&dst_node, &principal);
    loop {
        let outcome = ns
            .run_on_thread(move || apps::get(dst, path, CALL_TIMEOUT))
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

fn judge(
    outcome: &Outcome,
    expect: Expect,
    mtls_seen: impl FnOnce() -> bool,
    principal: &str,
) -> (bool, String) {
    let answered = matches!(outcome, Outcome::Answered { status: 200, .. });
    let mut observed = describe(outcome);
    let ok = match expect {
        Expect::Answered => answered,
        Expect::Denied => matches!(outcome, Outcome::Reset | Outcome::Closed),
        Expect::AnsweredMtls => {
            let mtls = answered && mtls_seen();
            if mtls {
                observed += &format!("; mutual_tls from {principal}");
            } else if answered {
                observed += "; no mTLS connection counted";
            }
            mtls
        }
    };
    (ok, observed)
}

/// One line for an outcome; for productpage's page, what it got from its own upstreams
/// (`HTTP 200 from productpage: details ok, reviews-v2 ok`).
fn describe(outcome: &Outcome) -> String {
    let Outcome::Answered { status, app, body } = outcome else {
        return outcome.to_string();
    };
    let from = app.as_deref().unwrap_or("?");
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

/// `meshnode sandbox`: up, the tutorial's steps, down (unless `keep`). Returns whether every check matched.
pub fn run(
    opts: &Options,
    keep: bool,
    out: &mut dyn Write,
    stop: &AtomicBool,
) -> Result<bool, Error> {
    let _ = writeln!(
        out,
        "meshnode sandbox {:?}: two nodes, the embedded control plane and bookinfo, in network namespaces\n",
        opts.name
    );
    let started = Instant::now();
    super::up(opts, out)?;
    let _ = writeln!(
        out,
        "  cluster up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
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
