//! Authorization decision cost: what one [`PolicySet::check`] costs with 1, 100 and 10 000 policies
//! that do not apply to the destination workload, next to the one policy that does.
//!
//! Job: build one [`PolicySet`] per size. Each holds the relevant policy (a `WorkloadSelector` ALLOW
//! `default/allow-productpage` for the principal `cluster.local/ns/default/sa/productpage`, listed in the
//! workload's `authorization_policies`) plus N unrelated ones, alternating ALLOW/DENY and cycling over
//! three kinds: `Namespace` policies of other namespaces (`ns-i`), `WorkloadSelector` policies in the
//! workload's own namespace under keys the workload does not list, and `WorkloadSelector` policies of
//! other namespaces. Every unrelated policy has a rule that would match any connection (a rule with no
//! clauses), so applying one by mistake would change the decision, not only the time.
//!
//! Two connections to the workload (namespace `default`, `10.0.1.1:8080`) are checked:
//!
//! | connection | decision | path through the engine |
//! |---|---|---|
//! | allowed | ALLOW | all four phases looked up, the ALLOW policy matches on its principal |
//! | denied | DENY (no ALLOW matched) | the same, the principal differs; nothing is allocated for this reason |
//!
//! Timing: a plain loop of `BENCH_AUTHZ_ITERATIONS` [200000] checks per measurement, repeated for
//! `BENCH_AUTHZ_ROUNDS` [15] rounds; the sizes are interleaved inside each round so that frequency
//! changes hit all sizes alike. The figure is the median of the rounds, in ns per check.
//!
//! Output (stdout): a Markdown table with the ratio of each size to the 1-policy baseline of the same
//! run. The goal (issue 5): about 1.0x at 10 000 policies. A smoke run:
//! `BENCH_AUTHZ_ITERATIONS=1000 BENCH_AUTHZ_ROUNDS=3 cargo bench --bench authz`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use meshnode::authz::{
    Action, Clause, Connection, Decision, DenyReason, Match, Policy, PolicySet, Rule, Scope,
    StringMatch,
};
use meshnode::identity::Identity;

/// Unrelated policy counts measured; the first is the baseline.
const SIZES: [usize; 3] = [1, 100, 10_000];
/// Default loop length: long enough (tens of ms) that timer resolution does not matter.
const DEFAULT_ITERATIONS: u64 = 200_000;
/// Default number of rounds the median is taken over.
const DEFAULT_ROUNDS: usize = 15;

const WORKLOAD_NAMESPACE: &str = "default";
const RELEVANT_KEY: &str = "default/allow-productpage";

fn main() {
    let iterations = env_or("BENCH_AUTHZ_ITERATIONS", DEFAULT_ITERATIONS).max(1);
    let rounds = env_or("BENCH_AUTHZ_ROUNDS", DEFAULT_ROUNDS as u64).max(1) as usize;

    let productpage: Identity = "spiffe://cluster.local/ns/default/sa/productpage"
        .parse()
        .expect("identity");
    let sleep: Identity = "spiffe://cluster.local/ns/other/sa/sleep"
        .parse()
        .expect("identity");
    let conn = |id| Connection {
        src: SocketAddr::from(([10, 0, 0, 1], 40000)),
        dst: SocketAddr::from(([10, 0, 1, 1], 8080)),
        src_identity: Some(id),
        dst_network: "",
    };
    let allowed = conn(&productpage);
    let denied = conn(&sleep);
    let keys = vec![RELEVANT_KEY.to_string()];

    let sets: Vec<PolicySet> = SIZES.iter().map(|&n| policy_set(n)).collect();
    for set in &sets {
        // The unrelated policies must not change the decisions.
        assert_eq!(
            set.check(WORKLOAD_NAMESPACE, &keys, &allowed),
            Decision::Allow
        );
        assert_eq!(
            set.check(WORKLOAD_NAMESPACE, &keys, &denied),
            Decision::Deny(DenyReason::NoAllowMatch)
        );
        assert_eq!(set.applicable(WORKLOAD_NAMESPACE, &keys).count(), 1);
    }

    // samples[size][connection] = ns per check, one per round.
    let mut samples = vec![[Vec::with_capacity(rounds), Vec::with_capacity(rounds)]; sets.len()];
    for set in &sets {
        time_checks(set, &keys, &allowed, iterations / 10 + 1); // warm-up
    }
    for round in 0..rounds {
        for i in 0..sets.len() {
            // Flip the order every round so no size always runs first.
            let i = if round % 2 == 0 {
                i
            } else {
                sets.len() - 1 - i
            };
            samples[i][0].push(time_checks(&sets[i], &keys, &allowed, iterations));
            samples[i][1].push(time_checks(&sets[i], &keys, &denied, iterations));
        }
    }

    let medians: Vec<[f64; 2]> = samples
        .iter_mut()
        .map(|[a, d]| [median(a), median(d)])
        .collect();
    let base = medians[0];
    println!(
        "authz bench: {iterations} checks per measurement, median of {rounds} rounds, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| unrelated policies | policies in set | allowed: ns/check | ratio | denied: ns/check | ratio |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for ((n, set), [a, d]) in SIZES.iter().zip(&sets).zip(&medians) {
        println!(
            "| {n} | {} | {a:.1} | {:.2}x | {d:.1} | {:.2}x |",
            set.len(),
            a / base[0],
            d / base[1]
        );
    }
}

/// Nanoseconds per check over `iterations` checks of `conn`.
fn time_checks(set: &PolicySet, keys: &[String], conn: &Connection<'_>, iterations: u64) -> f64 {
    let start = Instant::now();
    for _ in 0..iterations {
        let decision = black_box(set).check(
            black_box(WORKLOAD_NAMESPACE),
            black_box(keys),
            black_box(conn),
        );
        black_box(decision);
    }
    start.elapsed().as_nanos() as f64 / iterations as f64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The relevant policy plus `unrelated` policies that do not apply to the workload.
fn policy_set(unrelated: usize) -> PolicySet {
    let mut policies = Vec::with_capacity(unrelated + 1);
    policies.push(Policy {
        name: "allow-productpage".into(),
        namespace: WORKLOAD_NAMESPACE.into(),
        scope: Scope::WorkloadSelector,
        action: Action::Allow,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch::Exact(
                        "cluster.local/ns/default/sa/productpage".into(),
                    )],
                    ..Match::default()
                }],
            }],
        }],
    });
    for i in 0..unrelated {
        // i = 0 is a Namespace policy, so even the baseline has a non-empty namespace index.
        let (scope, namespace) = match i % 3 {
            0 => (Scope::Namespace, format!("ns-{i}")),
            1 => (Scope::WorkloadSelector, WORKLOAD_NAMESPACE.to_string()),
            _ => (Scope::WorkloadSelector, format!("ns-{i}")),
        };
        policies.push(Policy {
            name: format!("unrelated-{i}"),
            namespace,
            scope,
            action: if i % 2 == 0 {
                Action::Deny
            } else {
                Action::Allow
            },
            dry_run: false,
            // Matches everything: applying it by mistake would change the decision.
            rules: vec![Rule::default()],
        });
    }
    PolicySet::new(policies).expect("valid policies")
}

/// A numeric environment variable, or `default` when unset; exits with a message when malformed.
fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("{name}={v:?} is not a non-negative integer");
            std::process::exit(2)
        }),
    }
}
