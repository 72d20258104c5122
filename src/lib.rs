//! meshnode: the node side of an ambient-mode service mesh, wire-compatible with Istio's ztunnel.
//!
//! # Layout
//!
//! - [`file_watch`] — polling a config file and publishing each good version.
//! - [`config`] — typed settings from ztunnel's environment variables, parsed once.
//! - [`identity`] — SPIFFE identities, workload certificates (plug-in CA, built-in CA), rotation.
//! - [`tls`] — rustls configurations for HBONE and peer identity checks.
//! - [`control_plane`] — the embedded control plane: mesh file → istiod's xDS resources, delta ADS over TLS.
//! - [`grpc`] — TLS channels and credentials for the control plane (xDS, CA).
//! - [`xds`] — the delta ADS client: workloads, services and policies from istiod into [`state`].
//! - [`hbone`] — HTTP/2 CONNECT tunnels: client pool, server mechanics, byte copying.
//! - [`proxy`] — one workload's proxy: outbound (:15001), inbound HBONE (:15008), plaintext inbound (:15006).
//! - [`waypoint`] — `meshnode waypoint`: a namespace's L7 proxy (HBONE in, routes, L7 policy, HBONE out).
//! - [`gateway`] — `meshnode gateway`: a network's east-west gateway (double HBONE's middle hop).
//! - [`logging`] — log output (ztunnel's formats) and its level, changeable at run time.
//! - [`metrics`] — Istio's TCP metrics (prometheus-client) and the `GET /metrics` endpoint.
//! - [`inpod`] — shared mode: per-pod proxies inside pod network namespaces, driven by ZDS.
//! - [`state`] — workloads, services and policies as an immutable snapshot; ztunnel's local config format.
//! - [`authz`] — L4 authorization policies with ztunnel's semantics.
//! - [`netns`] — opening network namespaces and running code inside one.
//! - [`netsetup`] — named namespaces, veths, addresses, routes over rtnetlink (the sandbox's plumbing).
//! - [`sandbox`] — `meshnode sandbox`: two nodes, the control plane and bookinfo in network namespaces, the tutorial.
//! - [`redirect`] — the in-pod capture rules: nftables through netlink, ip rule and route (agent side).
//! - [`cni_agent`] — the CNI node agent: plugin events, enrollment, rules, ZDS server.
//! - [`cni_exec`] — calling a CNI plugin chain exactly as a container runtime does (tests, sandbox, benches).
//! - [`socket`] — listeners, marked upstream sockets, original destinations.
//! - [`admin`] — the proxy's admin API on localhost:15000 (`/config_dump`, `/logging`, `/quitquitquit`, profiles).
//! - [`allocator`] — handing freed memory back to the system after a large load (jemalloc).
//! - [`admin_http`] — the bounded one-request-per-connection HTTP server behind the admin ports.
//! - [`conn_slots`] — connection slots a newcomer takes from an idle holder (admin, plugin and ZDS sockets).
//! - [`task`] — spawning a per-connection task whose future is stored once, with its guard and cancellation.
//! - [`readiness`] — `:15021/healthz/ready`.
//! - [`zds`] — the ZDS protocol (SOCK_SEQPACKET + SCM_RIGHTS): agent-side server, proxy-side client.
//! - [`upgrade`] — keeping open connections across an upgrade: handing app-facing sockets, with what each
//!   connection needs to carry on, to the new process (issue 17; not wired into the proxy yet).
//! - [`proto`] — generated wire types of Istio's protocols.
//! - [`app`] — wiring a role together from its config.
//! - [`test_gate`] — whether a test's requirements (root, binaries) are met, and failing instead of skipping in CI.

pub mod admin;
pub mod admin_http;
pub mod allocator;
pub mod app;
pub mod authz;
pub mod cni_agent;
pub mod cni_exec;
pub mod config;
pub mod conn_slots;
pub mod control_plane;
pub mod dns;
pub mod file_watch;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod netsetup;
pub mod proto;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod sandbox;
pub mod socket;
pub mod state;
pub mod task;
#[doc(hidden)]
pub mod test_gate;
pub mod tls;
pub mod upgrade;
pub mod waypoint;
pub mod xds;
pub mod zds;
