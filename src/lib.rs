//! meshnode: the node side of an ambient-mode service mesh, wire-compatible with Istio's ztunnel.
//!
//! # Layout
//!
//! - [`config`] — typed settings from ztunnel's environment variables, parsed once.
//! - [`identity`] — SPIFFE identities, workload certificates (plug-in CA, built-in CA), rotation.
//! - [`tls`] — rustls configurations for HBONE and peer identity checks.
//! - [`hbone`] — HTTP/2 CONNECT tunnels: client pool, server mechanics, byte copying.
//! - [`proxy`] — one workload's proxy: outbound (:15001), inbound HBONE (:15008), plaintext inbound (:15006).
//! - [`state`] — workloads, services and policies as an immutable snapshot; ztunnel's local config format.
//! - [`authz`] — L4 authorization policies with ztunnel's semantics.
//! - [`socket`] — listeners, marked upstream sockets, original destinations.
//! - [`readiness`] — `:15021/healthz/ready`.
//! - [`proto`] — generated wire types of Istio's protocols.
//! - [`app`] — wiring a role together from its config.

pub mod app;
pub mod authz;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod proto;
pub mod proxy;
pub mod readiness;
pub mod socket;
pub mod state;
pub mod tls;
