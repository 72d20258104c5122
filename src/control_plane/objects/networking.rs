//! The shapes of Istio's `VirtualService` and `DestinationRule` (`networking.istio.io/v1`), camelCase,
//! unknown fields refused; the fields meshnode's waypoint cannot honour are read as [`Unsupported`] and
//! refused by name in `waypoints/`. Meaning: `waypoints.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{first_present, Labels, Unsupported};

/// A VirtualService's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    /// Service short names (the VirtualService's namespace) or FQDNs.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Only `mesh` (the default) is served.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// HTTP routes, in order.
    #[serde(default)]
    pub http: Vec<VsHttpRoute>,
    /// TCP routes, in order: the first whose match fits the port decides.
    #[serde(default)]
    pub tcp: Vec<VsTcpRoute>,
    /// Not supported.
    pub tls: Option<Unsupported>,
    /// Not supported.
    pub export_to: Option<Unsupported>,
}

impl VirtualServiceSpec {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("tls", self.tls.is_some()),
            ("exportTo", self.export_to.is_some()),
        ])
    }
}

/// One `tcp[]` route: weighted destinations for connections to the matched ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsTcpRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<VsL4Match>,
    #[serde(default)]
    pub route: Vec<VsRouteDestination>,
}

/// One `tcp[].match[]`: the service port only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsL4Match {
    pub port: Option<u16>,
    pub destination_subnets: Option<Unsupported>,
    pub source_labels: Option<Unsupported>,
    pub source_namespace: Option<Unsupported>,
    pub gateways: Option<Unsupported>,
}

impl VsL4Match {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("destinationSubnets", self.destination_subnets.is_some()),
            ("sourceLabels", self.source_labels.is_some()),
            ("sourceNamespace", self.source_namespace.is_some()),
            ("gateways", self.gateways.is_some()),
        ])
    }
}

/// One `http[]` route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsHttpRoute {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<VsMatch>,
    #[serde(default)]
    pub route: Vec<VsRouteDestination>,
    pub redirect: Option<VsRedirect>,
    pub direct_response: Option<VsDirectResponse>,
    pub rewrite: Option<VsRewrite>,
    pub timeout: Option<String>,
    pub retries: Option<VsRetries>,
    pub headers: Option<VsHeaders>,
    pub delegate: Option<Unsupported>,
    pub fault: Option<Unsupported>,
    pub mirror: Option<Unsupported>,
    pub mirrors: Option<Unsupported>,
    pub mirror_percent: Option<Unsupported>,
    pub mirror_percentage: Option<Unsupported>,
    pub cors_policy: Option<Unsupported>,
}

impl VsHttpRoute {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("delegate", self.delegate.is_some()),
            ("fault", self.fault.is_some()),
            ("mirror", self.mirror.is_some()),
            ("mirrors", self.mirrors.is_some()),
            ("mirrorPercent", self.mirror_percent.is_some()),
            ("mirrorPercentage", self.mirror_percentage.is_some()),
            ("corsPolicy", self.cors_policy.is_some()),
        ])
    }
}

/// One `match[]` entry: its fields AND-ed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsMatch {
    pub name: Option<String>,
    pub uri: Option<VsStringMatch>,
    pub method: Option<VsStringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, VsStringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, VsStringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, VsStringMatch>,
    pub port: Option<u16>,
    pub scheme: Option<Unsupported>,
    pub authority: Option<Unsupported>,
    pub source_labels: Option<Unsupported>,
    pub source_namespace: Option<Unsupported>,
    pub gateways: Option<Unsupported>,
    pub ignore_uri_case: Option<Unsupported>,
    pub stat_prefix: Option<Unsupported>,
}

impl VsMatch {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("scheme", self.scheme.is_some()),
            ("authority", self.authority.is_some()),
            ("sourceLabels", self.source_labels.is_some()),
            ("sourceNamespace", self.source_namespace.is_some()),
            ("gateways", self.gateways.is_some()),
            ("ignoreUriCase", self.ignore_uri_case.is_some()),
            ("statPrefix", self.stat_prefix.is_some()),
        ])
    }
}

/// Istio's `StringMatch`: one of the three.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsStringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// A weighted destination.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsRouteDestination {
    pub destination: VsDestination,
    pub weight: Option<i64>,
    pub headers: Option<Unsupported>,
}

/// `destination`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsDestination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<VsPort>,
}

/// `port: {number: N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsPort {
    /// The service port.
    pub number: u16,
}

/// `redirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u16>,
    pub derive_port: Option<Unsupported>,
}

/// `directResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsDirectResponse {
    pub status: u16,
    pub body: Option<VsBody>,
}

/// `directResponse.body`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsBody {
    pub string: Option<String>,
    pub bytes: Option<Unsupported>,
}

/// `rewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<Unsupported>,
}

/// `retries`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsRetries {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    /// Accepted and ignored (meshnode's waypoint has no backoff setting).
    pub backoff: Option<String>,
    pub retry_remote_localities: Option<Unsupported>,
    pub retry_ignore_previous_hosts: Option<Unsupported>,
}

/// `headers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsHeaders {
    pub request: Option<VsHeaderOps>,
    pub response: Option<VsHeaderOps>,
}

/// `headers.request` / `headers.response`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct VsHeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A DestinationRule's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    pub export_to: Option<Unsupported>,
    pub workload_selector: Option<Unsupported>,
}

impl DestinationRuleSpec {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("exportTo", self.export_to.is_some()),
            ("workloadSelector", self.workload_selector.is_some()),
        ])
    }
}

/// `subsets[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `trafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetectionSettings>,
    pub tls: Option<Unsupported>,
    pub port_level_settings: Option<Unsupported>,
    pub tunnel: Option<Unsupported>,
    pub proxy_protocol: Option<Unsupported>,
    pub retry_budget: Option<Unsupported>,
}

impl TrafficPolicy {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("tls", self.tls.is_some()),
            ("portLevelSettings", self.port_level_settings.is_some()),
            ("tunnel", self.tunnel.is_some()),
            ("proxyProtocol", self.proxy_protocol.is_some()),
            ("retryBudget", self.retry_budget.is_some()),
        ])
    }
}

/// `loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct LoadBalancerSettings {
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<Unsupported>,
    pub locality_lb_setting: Option<Unsupported>,
    pub warmup_duration_secs: Option<Unsupported>,
    pub warmup: Option<Unsupported>,
}

impl LoadBalancerSettings {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("consistentHash", self.consistent_hash.is_some()),
            ("localityLbSetting", self.locality_lb_setting.is_some()),
            ("warmupDurationSecs", self.warmup_duration_secs.is_some()),
            ("warmup", self.warmup.is_some()),
        ])
    }
}

/// Istio's simple load balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)] // Istio's names.
pub enum SimpleLb {
    Unspecified,
    /// Deprecated alias of LEAST_REQUEST.
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

/// `connectionPool`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

/// `connectionPool.tcp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct TcpSettings {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Option<Unsupported>,
    pub max_connection_duration: Option<Unsupported>,
    pub idle_timeout: Option<Unsupported>,
}

impl TcpSettings {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("tcpKeepalive", self.tcp_keepalive.is_some()),
            (
                "maxConnectionDuration",
                self.max_connection_duration.is_some(),
            ),
            ("idleTimeout", self.idle_timeout.is_some()),
        ])
    }
}

/// `connectionPool.http`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub idle_timeout: Option<String>,
    pub h2_upgrade_policy: Option<Unsupported>,
    pub use_client_protocol: Option<Unsupported>,
    pub max_concurrent_streams: Option<Unsupported>,
}

impl HttpSettings {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("h2UpgradePolicy", self.h2_upgrade_policy.is_some()),
            ("useClientProtocol", self.use_client_protocol.is_some()),
            (
                "maxConcurrentStreams",
                self.max_concurrent_streams.is_some(),
            ),
        ])
    }
}

/// `outlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct OutlierDetectionSettings {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
    pub consecutive_errors: Option<Unsupported>,
    pub min_health_percent: Option<Unsupported>,
    pub split_external_local_origin_errors: Option<Unsupported>,
    pub consecutive_local_origin_failures: Option<Unsupported>,
}

impl OutlierDetectionSettings {
    /// The first unsupported field present.
    pub fn unsupported(&self) -> Option<&'static str> {
        first_present(&[
            ("consecutiveErrors", self.consecutive_errors.is_some()),
            ("minHealthPercent", self.min_health_percent.is_some()),
            (
                "splitExternalLocalOriginErrors",
                self.split_external_local_origin_errors.is_some(),
            ),
            (
                "consecutiveLocalOriginFailures",
                self.consecutive_local_origin_failures.is_some(),
            ),
        ])
    }
}

/// A ServiceEntry's spec: hosts outside (or inside) the mesh that pods may address by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    /// VIPs (single addresses; CIDRs are not supported yet).
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<SePort>,
    /// `MESH_EXTERNAL` (default) or `MESH_INTERNAL`.
    pub location: Option<String>,
    /// `NONE` (default), `STATIC`, `DNS` or `DNS_ROUND_ROBIN`.
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    pub workload_selector: Option<SeWorkloadSelector>,
    /// `.` (this namespace only) or `*` (the default).
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// `ports[]` of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct SePort {
    pub number: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub name: String,
    pub target_port: Option<u16>,
}

/// `workloadSelector` of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct SeWorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

/// A WorkloadEntry's spec (also a ServiceEntry's `endpoints[]`): a workload outside Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct WorkloadEntrySpec {
    /// An IP address, or a hostname (resolved by the proxy when the ServiceEntry says `DNS`).
    #[serde(default)]
    pub address: String,
    /// Port name → port on this endpoint.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub locality: String,
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: String,
}
