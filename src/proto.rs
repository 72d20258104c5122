//! Generated wire types for Istio's protocols.
//!
//! `build.rs` compiles `proto/*.proto` (our own text, wire-identical to
//! Istio's and Envoy's definitions) with `protox` and `prost-build`. One module
//! per protobuf package:
//!
//! | module | package | used for |
//! |---|---|---|
//! | [`workload`] | `istio.workload` | xDS `Address` resources (workloads, services) |
//! | [`workload::zds`] | `istio.workload.zds` | ZDS, the CNI agent ↔ node proxy socket |
//! | [`security`] | `istio.security` | xDS `Authorization` resources (L4 policy) |
//! | [`discovery`] | `envoy.service.discovery.v3` | the delta ADS envelope |
//! | [`ca`] | `istio.v1.auth` | certificate signing requests to the Istio CA |
//! | [`waypoint`] | `meshnode.waypoint` | meshnode's own xDS `Waypoint` resources (L7 config of `meshnode waypoint`) |
//! | [`profile`] | `perftools.profiles` | the pprof profile format (the admin port's CPU profile) |
//!
//! Every message implements [`prost::Name`], whose `type_url()` is the xDS
//! type URL (`type.googleapis.com/<package>.<Message>`). The two gRPC services
//! come with tonic clients and servers: `discovery::aggregated_discovery_service_{client,server}`
//! and `ca::istio_certificate_service_{client,server}`.

// Lints allowed below fire on generated code we do not control:
// - `missing_docs` (when a crate enables it): prost emits fields, enum variants
//   and oneof enums without docs wherever the .proto has no comment (the
//   .proto is their doc). The `ca` module is fully commented, so it needs no
//   allowance; `zds` inherits the one on `workload`.
// - `clippy::large_enum_variant`: the `address::Type` oneof holds a whole
//   `Workload` or `Service` inline, as prost generates every oneof.

/// `istio.workload`: workloads and services (xDS type `istio.workload.Address`).
#[allow(missing_docs, clippy::large_enum_variant)]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));

    /// `istio.workload.zds`: the ZDS protocol between the CNI agent and the node proxy.
    pub mod zds {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
    }
}

/// `istio.security`: L4 authorization policies (xDS type `istio.security.Authorization`).
#[allow(missing_docs)]
pub mod security {
    include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
}

/// `meshnode.waypoint`: one waypoint's L7 configuration (xDS type `meshnode.waypoint.Waypoint`), meshnode's
/// own resource type, served beside the Istio ones.
#[allow(missing_docs)]
pub mod waypoint {
    include!(concat!(env!("OUT_DIR"), "/meshnode.waypoint.rs"));
}

/// `perftools.profiles`: the pprof profile format, as `go tool pprof` reads it.
#[allow(missing_docs)]
pub mod profile {
    include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
}

/// `envoy.service.discovery.v3`: the delta Aggregated Discovery Service envelope.
#[allow(missing_docs)]
pub mod discovery {
    include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
}

/// `istio.v1.auth`: the Istio CA's certificate signing API.
pub mod ca {
    include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
}

#[cfg(test)]
mod tests;
