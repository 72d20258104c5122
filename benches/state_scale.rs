//! Bytes per workload of the proxy's state: what one [`State`] holding N workloads and N/4 services costs
//! in live heap once loaded, what its load peaks at, and how long the load takes.
//!
//! Job: generate the mesh of `../shared/bench/genscale.py` (N workloads in 200 namespaces, 500 service
//! accounts, 100 nodes, each backing one of N/4 services with port 80 → 8080; plus the proxy's own
//! workload) and load it two ways:
//! - local config: YAML text → [`LocalConfig::parse`] → [`LocalConfig::into_state`] (whole, on one thread),
//!   and → `state::local::state_from_text` (in pieces on every core, as the proxy loads it); the YAML text
//!   is dropped before "live" is read, as the proxy drops it;
//! - xDS: one protobuf `Address` per workload and service → [`convert::address`] (with one interner for
//!   the whole push, as the client's cache keeps one) → [`State::with_shared`]; "live" counts the converted
//!   resources the client holds as well as the state built from them.
//!
//! Measurement: a counting global allocator (bench only). "live" is heap in use after the load minus
//! before it; "peak" is the highest heap in use during the load minus before it. Times are wall clock, one
//! load each (a load is long enough at the default size).
//!
//! Input: `BENCH_STATE_WORKLOADS` [50000]. Output (stdout): one Markdown table row per path. Run:
//! `cargo bench --bench state_scale` (or `BENCH_STATE_WORKLOADS=20000 cargo bench --bench state_scale`).
#![allow(unsafe_code)] // The counting allocator: a GlobalAlloc impl forwarding to the system allocator.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use meshnode::proto::workload as pb;
use meshnode::state::{Interner, LocalConfig, State};
use meshnode::xds::convert::{self, Address};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap in use now.
fn current() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Starts a peak window at the current level.
fn reset_peak() -> usize {
    let now = current();
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// genscale.py's YAML, byte for byte in structure.
fn yaml(n: usize) -> String {
    let svcs = (n / 4).max(1);
    let mut out = String::from("workloads:\n");
    let base = u32::from(Ipv4Addr::new(10, 100, 0, 1));
    for i in 0..n {
        let ip = Ipv4Addr::from(base + i as u32);
        let ns = i % 200;
        let s = i % svcs;
        let _ = write!(
            out,
            "- uid: cluster1//v1/Pod/ns{ns}/pod{i}\n  name: pod{i}\n  namespace: ns{ns}\n  \
             serviceAccount: sa{}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: node{}\n  services:\n    \
             \"ns{}/svc{s}.ns{}.svc.cluster.local\":\n      80: 8080\n",
            i % 500,
            i % 100,
            s % 200,
            s % 200,
        );
    }
    out.push_str(
        "- uid: cluster1//v1/Pod/default/me\n  name: me\n  namespace: default\n  serviceAccount: me\n  \
         trustDomain: cluster.local\n  workloadIps: [\"10.99.0.2\"]\n  protocol: HBONE\n  \
         node: node-me\n  services: {}\n",
    );
    out.push_str("services:\n");
    let vbase = u32::from(Ipv4Addr::new(10, 200, 0, 1));
    for j in 0..svcs {
        let ns = j % 200;
        let _ = write!(
            out,
            "- name: svc{j}\n  namespace: ns{ns}\n  hostname: svc{j}.ns{ns}.svc.cluster.local\n  \
             vips: [\"/{}\"]\n  ports:\n    80: 8080\n",
            Ipv4Addr::from(vbase + j as u32)
        );
    }
    out
}

/// The same mesh as xDS resources (name, message).
fn resources(n: usize) -> Vec<(String, pb::Address)> {
    let svcs = (n / 4).max(1);
    let base = u32::from(Ipv4Addr::new(10, 100, 0, 1));
    let port = |s, t| pb::Port {
        service_port: s,
        target_port: t,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(n + svcs);
    for i in 0..n {
        let ns = format!("ns{}", i % 200);
        let s = i % svcs;
        let uid = format!("cluster1//v1/Pod/{ns}/pod{i}");
        let w = pb::Workload {
            uid: uid.clone(),
            name: format!("pod{i}"),
            namespace: ns,
            service_account: format!("sa{}", i % 500),
            trust_domain: "cluster.local".into(),
            addresses: vec![Ipv4Addr::from(base + i as u32).octets().to_vec()],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            node: format!("node{}", i % 100),
            services: HashMap::from([(
                format!("ns{}/svc{s}.ns{}.svc.cluster.local", s % 200, s % 200),
                pb::PortList {
                    ports: vec![port(80, 8080)],
                },
            )]),
            ..Default::default()
        };
        out.push((
            uid,
            pb::Address {
                r#type: Some(pb::address::Type::Workload(w)),
            },
        ));
    }
    let vbase = u32::from(Ipv4Addr::new(10, 200, 0, 1));
    for j in 0..svcs {
        let ns = format!("ns{}", j % 200);
        let hostname = format!("svc{j}.{ns}.svc.cluster.local");
        let svc = pb::Service {
            name: format!("svc{j}"),
            hostname: hostname.clone(),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: Ipv4Addr::from(vbase + j as u32).octets().to_vec(),
                ..Default::default()
            }],
            ports: vec![port(80, 8080)],
            namespace: ns.clone(),
            ..Default::default()
        };
        out.push((
            format!("{ns}/{hostname}"),
            pb::Address {
                r#type: Some(pb::address::Type::Service(svc)),
            },
        ));
    }
    out
}

struct Row {
    path: &'static str,
    live: usize,
    peak: usize,
    ms: f64,
}

fn main() {
    let n: usize = std::env::var("BENCH_STATE_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let mut rows = Vec::new();

    // Local config: whole (one thread, one event list), then as the proxy loads it (in pieces, on every
    // core).
    for (path, in_pieces) in [
        ("local config, whole", false),
        ("local config, in pieces", true),
    ] {
        let text = yaml(n);
        let bytes = text.len();
        let before = reset_peak() - bytes;
        let t0 = Instant::now();
        let state = if in_pieces {
            meshnode::state::local::state_from_text(&text)
        } else {
            LocalConfig::parse(&text).and_then(LocalConfig::into_state)
        }
        .expect("generated config loads");
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        drop(text);
        assert_eq!(state.workload_count(), n + 1);
        rows.push(Row {
            path,
            live: current() - before,
            peak: PEAK.load(Ordering::Relaxed) - before,
            ms,
        });
        drop(black_box(state));
    }

    // xDS.
    let msgs = resources(n);
    let before = reset_peak();
    let t0 = Instant::now();
    let mut interner = Interner::default();
    let mut held = Vec::with_capacity(msgs.len());
    for (name, msg) in &msgs {
        held.push(
            convert::address_in(name, msg.clone(), &mut interner).expect("generated resource"),
        );
    }
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    for a in &held {
        match a {
            Address::Workload(w) => workloads.push(w.clone()),
            Address::Service(s) => services.push((**s).clone()),
        }
    }
    let state = State::with_shared(workloads, services, Default::default())
        .expect("generated resources index");
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let live = current().saturating_sub(before);
    assert_eq!(state.workload_count(), n);
    rows.push(Row {
        path: "xDS (held resources + state)",
        live,
        peak: PEAK.load(Ordering::Relaxed).saturating_sub(before),
        ms,
    });
    drop(black_box((state, held, msgs, interner)));

    println!(
        "{n} workloads, {} services; local config {} bytes\n",
        (n / 4).max(1),
        yaml(n).len()
    );
    println!("| path | live bytes/workload | peak bytes/workload | build ms |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.0} |",
            r.path,
            r.live / n,
            r.peak / n,
            r.ms
        );
    }
}
