//! The shapes of Gateway API's `Gateway` (as `istioctl waypoint apply` writes a waypoint, and as Istio's
//! multi-network docs write an east-west gateway) and `HTTPRoute` (`gateway.networking.k8s.io/v1`),
//! camelCase, unknown fields refused. Meaning: `waypoints.rs` (class `istio-waypoint`) and `topology.rs`
//! (class `istio-east-west`).

use serde::Deserialize;

use super::{first_present, Labels, Unsupported};

/// The pod label naming the Gateway the pod is an instance of (set by Istio's gateway controller on the
/// pods it deploys for a Gateway).
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

/// A Gateway's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// `istio-waypoint` for a waypoint, `istio-east-west` for a network's east-west gateway (the classes
    /// meshnode serves).
    #[serde(default)]
    pub gateway_class_name: String,
    /// Listeners (a waypoint has one: `mesh`, 15008, HBONE; an east-west gateway an HBONE one).
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// The addresses asked for (an east-west gateway's first is its address; not supported on waypoints).
    pub addresses: Option<Vec<GatewaySpecAddress>>,
    /// Not supported.
    pub infrastructure: Option<Unsupported>,
    /// Not supported.
    #[serde(rename = "backendTLS")]
    pub backend_tls: Option<Unsupported>,
}

impl GatewaySpec {
    /// The first field present that no Gateway class meshnode serves supports (`addresses` is
    /// supported by east-west gateways only, so their users check it).
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("infrastructure", self.infrastructure.is_some()),
            ("backendTLS", self.backend_tls.is_some()),
        ])
    }
}

/// A `spec.addresses` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpecAddress {
    /// `IPAddress` (Gateway API's default), `Hostname`, or an implementation-specific type.
    pub r#type: Option<String>,
    /// The address.
    pub value: String,
}

/// A Gateway listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Listener name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Protocol (`HBONE` for a waypoint).
    pub protocol: String,
    /// Which namespaces may bind (default: the Gateway's own).
    pub allowed_routes: Option<AllowedRoutes>,
    /// Not supported.
    pub hostname: Option<Unsupported>,
    /// TLS (an east-west gateway's HBONE listener terminates mesh mTLS; not supported on waypoints).
    pub tls: Option<ListenerTls>,
}

/// A listener's `tls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTls {
    /// Terminate (Gateway API's default) or Passthrough.
    pub mode: Option<TlsMode>,
    /// Implementation options (`gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL`).
    #[serde(default)]
    pub options: Labels,
    /// Not supported.
    pub certificate_refs: Option<Unsupported>,
    /// Not supported.
    pub frontend_validation: Option<Unsupported>,
}

/// Gateway API TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[allow(missing_docs)] // Gateway API's names.
pub enum TlsMode {
    Terminate,
    Passthrough,
}

/// `allowedRoutes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedRoutes {
    /// Namespaces allowed.
    pub namespaces: Option<RouteNamespaces>,
    /// Not supported.
    pub kinds: Option<Unsupported>,
}

/// `allowedRoutes.namespaces`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteNamespaces {
    /// All, Same (default) or Selector.
    pub from: Option<FromNamespaces>,
    /// For `Selector`: namespace labels.
    pub selector: Option<LabelSelector>,
}

/// Gateway API `FromNamespaces`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum FromNamespaces {
    /// Any namespace.
    All,
    /// The Gateway's namespace.
    #[default]
    Same,
    /// Namespaces whose labels match the selector.
    Selector,
}

/// A Kubernetes label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must all be present with these values.
    #[serde(default)]
    pub match_labels: Labels,
    /// Not supported.
    pub match_expressions: Option<Unsupported>,
}

/// An HTTPRoute's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// The Services the routes attach to (GAMMA "mesh" parents).
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Not supported with Service parents (must be empty).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A `parentRefs` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// `""` (or `core`) for a Service.
    pub group: Option<String>,
    /// `Service` (Gateway API's default is `Gateway`, which meshnode does not serve).
    pub kind: Option<String>,
    /// The Service's name.
    pub name: String,
    /// The Service's namespace (default: the route's).
    pub namespace: Option<String>,
    /// Only this service port.
    pub port: Option<u16>,
    /// Not supported.
    pub section_name: Option<Unsupported>,
}

/// An HTTPRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Rule name (for logs).
    pub name: Option<String>,
    /// OR-ed matches (none: every request).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries.
    pub retry: Option<HttpRouteRetry>,
    /// Not supported.
    pub session_persistence: Option<Unsupported>,
}

/// An HTTPRoute match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Path (default: PathPrefix `/`).
    pub path: Option<HttpPathMatch>,
    /// Headers, AND-ed.
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
    /// Query parameters, AND-ed.
    #[serde(default)]
    pub query_params: Vec<HttpValueMatch>,
    /// Method.
    pub method: Option<String>,
}

/// A path match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// Exact, PathPrefix (default) or RegularExpression (not supported).
    pub r#type: Option<PathMatchType>,
    /// The path (default `/`).
    pub value: Option<String>,
}

/// Gateway API path match types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[allow(missing_docs)] // Gateway API's names.
pub enum PathMatchType {
    Exact,
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpValueMatch {
    /// Exact (default) or RegularExpression (not supported).
    pub r#type: Option<ValueMatchType>,
    /// Header or parameter name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// Gateway API header / query match types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[allow(missing_docs)] // Gateway API's names.
pub enum ValueMatchType {
    Exact,
    RegularExpression,
}

/// An HTTPRoute filter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    /// Which filter.
    pub r#type: FilterType,
    /// For RequestHeaderModifier.
    pub request_header_modifier: Option<HeaderModifier>,
    /// For ResponseHeaderModifier.
    pub response_header_modifier: Option<HeaderModifier>,
    /// For RequestRedirect.
    pub request_redirect: Option<RequestRedirect>,
    /// For URLRewrite.
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    /// Not supported.
    pub request_mirror: Option<Unsupported>,
    /// Not supported.
    pub cors: Option<Unsupported>,
    /// Not supported.
    pub extension_ref: Option<Unsupported>,
}

/// Gateway API filter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[allow(missing_docs)] // Gateway API's names.
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
    #[serde(rename = "CORS")]
    Cors,
    ExtensionRef,
}

/// RequestHeaderModifier / ResponseHeaderModifier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Headers set (replacing).
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    /// Headers added.
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    /// Header names removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// RequestRedirect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    pub scheme: Option<String>,
    /// Host.
    pub hostname: Option<String>,
    /// Path change.
    pub path: Option<PathModifier>,
    /// Port.
    pub port: Option<u16>,
    /// 301 or 302 (default 302).
    pub status_code: Option<u16>,
}

/// URLRewrite.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    /// Host.
    pub hostname: Option<String>,
    /// Path change.
    pub path: Option<PathModifier>,
}

/// A path change.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    /// ReplaceFullPath or ReplacePrefixMatch.
    pub r#type: PathModifierType,
    /// For ReplaceFullPath.
    pub replace_full_path: Option<String>,
    /// For ReplacePrefixMatch.
    pub replace_prefix_match: Option<String>,
}

/// Gateway API path modifier types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[allow(missing_docs)] // Gateway API's names.
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// A backendRef.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    /// `""` (or `core`) for a Service.
    pub group: Option<String>,
    /// `Service` (default).
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Service namespace (default and only choice: the route's).
    pub namespace: Option<String>,
    /// Service port (required for a Service).
    pub port: Option<u16>,
    /// Relative weight (default 1).
    pub weight: Option<u32>,
    /// Not supported.
    pub filters: Option<Unsupported>,
}

/// Rule timeouts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// Whole request.
    pub request: Option<String>,
    /// Each try.
    pub backend_request: Option<String>,
}

/// Rule retry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    /// Retries (default 2).
    pub attempts: Option<u32>,
    /// Status codes retried.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Accepted and ignored (meshnode's waypoint has no backoff setting).
    pub backoff: Option<String>,
}
