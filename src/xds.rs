//! The xDS client: workloads, services and authorization policies from istiod (or
//! `meshnode control-plane`) over delta ADS, as ztunnel receives them.
//!
//! Input: a [`GrpcTarget`](crate::config::GrpcTarget) (`XDS_ADDRESS`, `XDS_ROOT_CA`, `ALT_XDS_HOSTNAME`,
//! `XDS_HEADER_*`), [`grpc::Credentials`](crate::grpc::Credentials) (bearer token, `clusterid`) and a
//! [`NodeInfo`] built from the proxy's own pod. Output: a new [`State`](crate::state::State) snapshot
//! published on a `watch` channel after each response that changed something, and a one-shot `synced`
//! callback for readiness.
//!
//! Protocol (ztunnel `src/xds/client.rs`): one `DeltaAggregatedResources` stream carrying two wildcard
//! subscriptions, [`ADDRESS_TYPE`] and [`AUTHORIZATION_TYPE`]. Each initial request carries the node and
//! `initial_resource_versions` (what is held, with versions), so a reconnect resumes rather than restarts.
//! Every response is answered: ACK `{type_url, response_nonce}`, or NACK with
//! `error_detail.message = "<name>: <reason>; ..."`. A bad resource is named in the NACK; its previous
//! good version, if any, stays; a refused policy with no good version is enforced through a fail-safe
//! stand-in that can only deny more (never allow more than with the policy); the others in the same
//! response are applied.
//!
//! Parts: [`convert`] (protobuf → state types), `cache` (the resources held, per type, with versions;
//! applying one response), `client` (the stream, reconnects, ACK/NACK, publishing).
//!
//! Differences from ztunnel, on purpose: an unknown type URL is NACKed (ztunnel ACKs it); the versions
//! sent on reconnect are the real ones (ztunnel sends `""`); a response with some rejected resources still
//! counts towards readiness once its good resources are applied (ztunnel waits for a clean ACK); no state
//! is published before both types have arrived once, so the proxy never runs with workloads but without
//! their policies; stricter conversions (see [`convert`]); bounded message size and resource count
//! ([`Limits`]).

mod cache;
mod client;
pub mod convert;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use client::XdsClient;
pub use convert::ConvertError;

use crate::config::ProxyMeta;
use crate::proto::discovery;

/// Type URL of workload and service resources.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of authorization policy resources.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// ztunnel's node id when `INSTANCE_IP` is unset.
const DEFAULT_INSTANCE_IP: &str = "1.1.1.1";

/// Bounds on what the control plane may make the client hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest response accepted, in bytes (gRPC decoding limit). Larger ones end the stream with an error
    /// and the client reconnects, keeping its state.
    pub max_message_size: usize,
    /// Most resources held, both types together. New names past the limit are NACKed; updates and
    /// removals of held names still apply.
    pub max_resources: usize,
}

impl Default for Limits {
    /// 64 MiB per message (ztunnel allows 200 MiB): istiod sends the whole mesh in its first response, and
    /// a workload is ~300–600 bytes on the wire, so this is ~100k workloads, while bounding the buffer a
    /// single response can pin (decoded, it is several times larger). 256k resources: the same order of
    /// mesh size, at ~1–2 KiB each in memory.
    fn default() -> Limits {
        Limits {
            max_message_size: 64 * 1024 * 1024,
            max_resources: 256 * 1024,
        }
    }
}

/// The xDS `Node` the proxy presents: id and metadata exactly as ztunnel builds them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// `ztunnel~<INSTANCE_IP|1.1.1.1>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`.
    pub id: String,
    /// `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, then the proxy metadata (`ISTIO_META_*`,
    /// `ISTIO_METAJSON_*`), which wins on a clash as in ztunnel.
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl NodeInfo {
    /// The node for a proxy running as pod `meta` on node `node_name` (`NODE_NAME`).
    pub fn new(meta: &ProxyMeta, node_name: Option<&str>) -> NodeInfo {
        let ip = meta
            .instance_ip
            .map_or_else(|| DEFAULT_INSTANCE_IP.to_string(), |ip| ip.to_string());
        let ns = &meta.pod_namespace;
        let id = format!("ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local", meta.pod_name);
        let mut metadata = BTreeMap::new();
        let s = |v: &str| serde_json::Value::String(v.to_string());
        metadata.insert("NAME".to_string(), s(&meta.pod_name));
        metadata.insert("NAMESPACE".to_string(), s(ns));
        metadata.insert("INSTANCE_IPS".to_string(), s(&ip));
        metadata.insert("NODE_NAME".to_string(), s(node_name.unwrap_or_default()));
        for (k, v) in &meta.metadata {
            metadata.insert(k.clone(), v.clone());
        }
        NodeInfo { id, metadata }
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> discovery::Node {
        discovery::Node {
            id: self.id.clone(),
            metadata: Some(prost_types::Struct {
                fields: self
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), json_to_value(v)))
                    .collect(),
            }),
            ..Default::default()
        }
    }
}

fn json_to_value(json: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match json {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        // Protobuf numbers are doubles; every JSON number has one (huge integers lose precision, as in
        // ztunnel).
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Why one resource of a response was rejected (an entry of the NACK).
#[derive(Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ResourceError {
    /// The `Resource` carries no `Any`.
    #[error("resource has no body")]
    MissingBody,
    /// The `Any` inside is of another type than the response's.
    #[error("resource body is {got:?}, expected {expected:?}")]
    WrongType {
        /// The response's type URL.
        expected: &'static str,
        /// The body's type URL.
        got: String,
    },
    /// The body is not valid protobuf for its type.
    #[error("cannot decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The body decodes but cannot be used.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// Holding another resource would exceed [`Limits::max_resources`].
    #[error("resource limit reached ({limit} resources held)")]
    TooMany {
        /// The limit.
        limit: usize,
    },
}

/// Why a whole response was refused (NACKed, nothing applied).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// The response's type URL is neither [`ADDRESS_TYPE`] nor [`AUTHORIZATION_TYPE`].
    #[error("unknown type URL {type_url:?}")]
    UnknownType {
        /// The type URL.
        type_url: String,
    },
    /// The resources are individually valid but do not form a consistent state.
    #[error("inconsistent state: {0}")]
    State(#[from] crate::state::Error),
    /// The policies are individually valid but do not form a policy set.
    #[error("inconsistent policies: {0}")]
    Policies(#[from] crate::authz::Error),
}

/// Why a stream to the control plane ended (the client logs it and reconnects).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The channel could not be set up (bad address, unreadable roots).
    #[error("xDS channel: {0}")]
    Channel(#[source] crate::grpc::Error),
    /// The credentials could not be attached (token file unreadable, bad header value).
    #[error("xDS credentials: {0}")]
    Credentials(#[source] crate::grpc::Error),
    /// The stream could not be opened.
    #[error("connecting to xDS {address}: {status}")]
    Connect {
        /// The address dialled.
        address: String,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// The stream failed after it was opened (including an oversized or undecodable message).
    #[error("xDS stream: {0}")]
    Stream(tonic::Status),
    /// The server ended the stream without ever answering.
    #[error("xDS stream ended before any response")]
    EndedEarly,
    /// The request side of the stream was closed by the transport.
    #[error("xDS stream: request side closed")]
    RequestsClosed,
}
