//! The xDS client: workloads, services and authorization policies from istiod (or
//! `meshnode control-plane`) over delta ADS, as ztunnel receives them; and, for `meshnode waypoint`, its
//! own `meshnode.waypoint.Waypoint` resource beside them.
//!
//! Input: a [`GrpcTarget`](crate::config::GrpcTarget) (`XDS_ADDRESS`, `XDS_ROOT_CA`, `ALT_XDS_HOSTNAME`,
//! `XDS_HEADER_*`), [`grpc::Credentials`](crate::grpc::Credentials) (bearer token, `clusterid`) and a
//! [`NodeInfo`] built from the proxy's own pod. Output, for the node proxy: a new
//! [`State`](crate::state::State) snapshot published on a `watch` channel after each response that
//! changed something; for a waypoint ([`XdsClient::for_waypoint`]): the [`WaypointResources`] handed to
//! its [`WaypointSubscription`]'s `publish` after each such response. Either way a one-shot `synced`
//! callback for readiness.
//!
//! Protocol (ztunnel `src/xds/client.rs`): one `DeltaAggregatedResources` stream carrying two wildcard
//! subscriptions, [`ADDRESS_TYPE`] and [`AUTHORIZATION_TYPE`]; a waypoint adds a third, [`WAYPOINT_TYPE`],
//! naming only its own resource (`resource_names_subscribe: ["<namespace>/<gateway name>"]`; resources of
//! that type under other names are ignored, should a server send them anyway). Each initial request carries the node and
//! `initial_resource_versions` (what is held, with versions), so a reconnect resumes rather than restarts.
//! Every response is answered: ACK `{type_url, response_nonce}`, or NACK with
//! `error_detail.message = "<name>: <reason>; ..."`. A bad resource is named in the NACK; its previous
//! good version, if any, stays; a refused policy with no good version is enforced through a fail-safe
//! stand-in that can only deny more (never allow more than with the policy); the others in the same
//! response are applied. A `Waypoint` is refused when its subscription's `check` (the waypoint's own
//! compilation of routes and policies) refuses it.
//!
//! Parts: [`convert`] (protobuf → state types), `cache` (the resources held, per type, with versions;
//! applying one response), `client` (the stream, reconnects, ACK/NACK, publishing).
//!
//! Differences from ztunnel, on purpose: an unknown type URL is NACKed (ztunnel ACKs it); the versions
//! sent on reconnect are the real ones (ztunnel sends `""`); a response with some rejected resources still
//! counts towards readiness once its good resources are applied (ztunnel waits for a clean ACK); no state
//! is published before every subscribed type has arrived once, so the proxy never runs with workloads but
//! without their policies (nor a waypoint with routes but without workloads); stricter conversions (see
//! [`convert`]); bounded message size and resource count ([`Limits`]).

mod cache;
mod client;
pub mod convert;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use client::XdsClient;
pub use convert::ConvertError;

use crate::config::ProxyMeta;
use crate::proto::discovery;
use crate::state::{Service, Workload};

/// Type URL of workload and service resources.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of authorization policy resources.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of meshnode's waypoint configuration resources.
pub const WAYPOINT_TYPE: &str = "type.googleapis.com/meshnode.waypoint.Waypoint";

/// What a waypoint is configured from: every Address workload and service held, and its own `Waypoint`
/// resource once received.
#[derive(Debug, Clone, Default)]
pub struct WaypointResources {
    /// The workloads.
    pub workloads: Vec<Arc<Workload>>,
    /// The services.
    pub services: Vec<Arc<Service>>,
    /// This waypoint's configuration (`None` until the control plane has sent it, or after it removed it).
    pub waypoint: Option<Arc<crate::proto::waypoint::Waypoint>>,
}

/// Validates a `Waypoint` before it is held: `Err(reason)` NACKs it (the previous good one stays).
pub type WaypointCheck =
    Box<dyn Fn(&crate::proto::waypoint::Waypoint) -> Result<(), String> + Send>;
/// Receives each new set of [`WaypointResources`] (on the xDS thread).
pub type WaypointPublish = Box<dyn FnMut(WaypointResources) + Send>;

/// A waypoint's subscription: its own resource name, how to validate it, where the results go.
pub struct WaypointSubscription {
    /// `<gateway namespace>/<gateway name>`.
    pub name: String,
    /// The waypoint's own validation.
    pub check: WaypointCheck,
    /// Where every new set goes once all three types have arrived.
    pub publish: WaypointPublish,
}

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
    /// `ztunnel~<INSTANCE_IP|1.1.1.1>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`
    /// (`router~…` for a waypoint).
    pub id: String,
    /// `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, then the proxy metadata (`ISTIO_META_*`,
    /// `ISTIO_METAJSON_*`), which wins on a clash as in ztunnel.
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl NodeInfo {
    /// The node for a proxy running as pod `meta` on node `node_name` (`NODE_NAME`).
    pub fn new(meta: &ProxyMeta, node_name: Option<&str>) -> NodeInfo {
        NodeInfo::of_type("ztunnel", meta, node_name)
    }

    /// The node for a waypoint: as [`NodeInfo::new`], with Istio's proxy type of waypoints and gateways,
    /// `router`, in place of `ztunnel` in the id.
    pub fn waypoint(meta: &ProxyMeta, node_name: Option<&str>) -> NodeInfo {
        NodeInfo::of_type("router", meta, node_name)
    }

    fn of_type(kind: &str, meta: &ProxyMeta, node_name: Option<&str>) -> NodeInfo {
        let ip = meta
            .instance_ip
            .map_or_else(|| DEFAULT_INSTANCE_IP.to_string(), |ip| ip.to_string());
        let ns = &meta.pod_namespace;
        let id = format!("{kind}~{ip}~{}.{ns}~{ns}.svc.cluster.local", meta.pod_name);
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
    /// The waypoint refused its configuration.
    #[error("waypoint configuration refused: {0}")]
    Waypoint(String),
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
    /// The response's type URL is not one subscribed to ([`ADDRESS_TYPE`], [`AUTHORIZATION_TYPE`], and
    /// [`WAYPOINT_TYPE`] for a waypoint).
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
