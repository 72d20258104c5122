//! Prometheus metrics with ztunnel's names and labels, and the `GET /metrics` endpoint that serves them.
//!
//! Owner: the proxy records, the app serves. Input: one [`Metrics`] per process (a prometheus-client
//! [`Registry`] plus the TCP families registered in it), shared by every proxy through
//! [`ProxyInputs::metrics`](crate::proxy::ProxyInputs). Output: the families below, encoded as OpenMetrics
//! text by [`serve`] on the listener it is given (`:15020` in production).
//!
//! | name (as scraped) | when |
//! |---|---|
//! | `istio_tcp_connections_opened_total` | a connection is accepted for a workload (before authorization) |
//! | `istio_tcp_connections_closed_total` | it ends, whatever the reason (`response_flags` says why) |
//! | `istio_tcp_connections_failed_total` | it ends with `response_flags` other than `-` (`DENY`, `CONNECT`, `TLS_FAILURE`, `H2_HANDSHAKE_FAILURE`, `NETWORK_POLICY`, `IDENTITY_ERROR`) |
//! | `istio_tcp_received_bytes_total` | as they are copied: bytes from the initiator towards the server |
//! | `istio_tcp_sent_bytes_total` | as they are copied: bytes from the server towards the initiator |
//! | `istio_tcp_sockets_open` | gauge per `reporter`: connections opened here and not yet closed |
//! | `istio_build` | always 1, labelled `component="ztunnel"` and `tag=<version>` (what Istio's dashboards select on) |
//! | `workload_manager_active_proxy_count`, `workload_manager_pending_proxy_count` | shared mode: pods served, pods whose proxy could not start yet ([`WorkloadManagerMetrics`]) |
//! | `workload_manager_proxies_started_total`, `workload_manager_proxies_stopped_total` | shared mode: pod proxies started, and drained |
//! | `process_open_fds`, `process_max_fds`, `process_resident_memory_bytes`, `process_threads` | read at each scrape ([`ProcessCollector`]) |
//! | `istio_xds_message_total`, `istio_xds_message_bytes_total` | each xDS response received, by `url` (its type URL), and its encoded size ([`XdsMetrics`]) |
//! | `istio_xds_connection_terminations_total` | each xDS stream's end, by `reason`: `Complete` (the server ended it), `Reconnect` (a routine end), `ConnectionError` (it could not be opened), `Error` |
//! | `istio_dns_requests_total` | a DNS query the pod's DNS proxy answers itself (a mesh name), or from a client it cannot identify ([`DnsMetrics`]) |
//! | `istio_dns_upstream_requests_total`, `istio_dns_upstream_failures_total`, `istio_dns_upstream_request_duration_seconds` | a query forwarded to the upstream resolvers; those that got no answer; how long the answer took |
//! | `meshnode_waypoint_unavailable_total` | an outbound connection that must pass a waypoint is refused because the waypoint is missing, unresolvable or unreachable ([`WaypointLabels`]) |
//!
//! Both sides record: inbound (:15008, :15006) with `reporter="destination"`, outbound (:15001) with
//! `reporter="source"`. Byte directions are the same for both reporters (received = initiator → server),
//! as Istio defines them. For a connection sent to a waypoint, `destination_service` is the service
//! the application addressed while the `destination_workload*` and `destination_principal` labels
//! describe the waypoint, as ztunnel reports them.
//!
//! Labels are ztunnel's CommonTrafficLabels ([`TrafficLabels`]) in its order; empty values read
//! `unknown`; the locality labels (`source_region`, `source_zone`, `destination_region`,
//! `destination_zone`) come last and only when either workload is known, as ztunnel adds them. Cost: a label set is built (a few small strings) and looked up in its family once per
//! connection, at open and at close. Bytes are counted while the connection lives, as ztunnel counts them
//! (a long connection shows its traffic before it ends): the copy holds the two byte counters of its label
//! set ([`ConnectionRecord::live_bytes`], `Arc` clones taken at open) and adds to them per read or write,
//! one atomic add, no lookup and no lock; they carry `response_flags="-"`, as ztunnel's do.

mod process;
mod serve;

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::state::{GatewayAddress, GatewayDestination, Locality, Service, SharedStr, Workload};

pub use process::ProcessCollector;
pub use serve::{serve, serve_encoded};

/// Who reports a connection: the proxy of the client (`source`) or of the server (`destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The label values are these names, lower case, as in ztunnel.
pub enum Reporter {
    /// The client side's proxy (outbound).
    source,
    /// The server side's proxy (inbound).
    destination,
}

/// Why a connection failed (ztunnel's `response_flags`); `-` when it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResponseFlags {
    /// No failure.
    #[default]
    None,
    /// Refused or closed by authorization.
    Deny,
    /// The upstream could not be reached.
    Connect,
    /// The TLS handshake with the peer proxy failed (`TLS_FAILURE`).
    TlsFailure,
    /// The HTTP/2 handshake or the CONNECT exchange failed (`H2_HANDSHAKE_FAILURE`).
    H2HandshakeFailure,
    /// Connecting to the peer's HBONE port timed out: most often a NetworkPolicy dropping port 15008
    /// (`NETWORK_POLICY`, ztunnel's guess too).
    NetworkPolicy,
    /// No certificate for the identity to present (`IDENTITY_ERROR`).
    IdentityError,
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let s = match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
            ResponseFlags::TlsFailure => "TLS_FAILURE",
            ResponseFlags::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlags::NetworkPolicy => "NETWORK_POLICY",
            ResponseFlags::IdentityError => "IDENTITY_ERROR",
        };
        EncodeLabelValue::encode(&s, encoder)
    }
}

/// Whether the connection arrived over mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The label values are these names, as in ztunnel.
pub enum SecurityPolicy {
    /// HBONE (peer identity known).
    mutual_tls,
    /// Plaintext.
    unknown,
}

/// ztunnel's CommonTrafficLabels, in its encoding order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrafficLabels {
    /// `source` or `destination`.
    pub reporter: Reporter,
    /// Who talked to whom.
    #[prometheus(flatten)]
    pub peer: PeerLabels,
    /// Always `tcp` at L4.
    pub request_protocol: &'static str,
    /// Why it failed, `-` if it did not.
    pub response_flags: ResponseFlags,
    /// `mutual_tls` or `unknown`.
    pub connection_security_policy: SecurityPolicy,
    /// `source_region`, `source_zone`, `destination_region`, `destination_zone`, last.
    #[prometheus(flatten)]
    pub locality: LocalityLabels,
}

/// ztunnel's locality labels: present (each part `unknown` when empty) once either side's workload is
/// known, absent from the label set otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LocalityLabels(Option<LocalityValues>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LocalityValues {
    source_region: SharedStr,
    source_zone: SharedStr,
    destination_region: SharedStr,
    destination_zone: SharedStr,
}

impl LocalityLabels {
    /// The labels for a connection from `src` to `dst` (absent when neither is known).
    pub fn new(src: Option<&Workload>, dst: Option<&Workload>) -> LocalityLabels {
        if src.is_none() && dst.is_none() {
            return LocalityLabels(None);
        }
        let part = |w: Option<&Workload>, f: fn(&Locality) -> &str| {
            val_str(w.and_then(|w| w.locality.as_deref()).map_or("", f))
        };
        LocalityLabels(Some(LocalityValues {
            source_region: part(src, |l| &l.region),
            source_zone: part(src, |l| &l.zone),
            destination_region: part(dst, |l| &l.region),
            destination_zone: part(dst, |l| &l.zone),
        }))
    }
}

impl EncodeLabelSet for LocalityLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(values) => values.encode(encoder),
            None => Ok(()),
        }
    }
}

/// Istio's standard `source_*` and `destination_*` labels, in ztunnel's encoding order: the part of the label
/// set the node proxy's TCP families and the waypoint's request families share.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PeerLabels {
    /// Source workload (owner) name.
    pub source_workload: SharedStr,
    /// Source canonical service.
    pub source_canonical_service: SharedStr,
    /// Source canonical revision.
    pub source_canonical_revision: SharedStr,
    /// Source namespace.
    pub source_workload_namespace: SharedStr,
    /// Source identity (`spiffe://…`), only from mTLS.
    pub source_principal: SharedStr,
    /// Source app (canonical name).
    pub source_app: SharedStr,
    /// Source version (canonical revision).
    pub source_version: SharedStr,
    /// Source cluster.
    pub source_cluster: SharedStr,
    /// Destination service hostname.
    pub destination_service: SharedStr,
    /// Destination service namespace.
    pub destination_service_namespace: SharedStr,
    /// Destination service name.
    pub destination_service_name: SharedStr,
    /// Destination workload (owner) name.
    pub destination_workload: SharedStr,
    /// Destination canonical service.
    pub destination_canonical_service: SharedStr,
    /// Destination canonical revision.
    pub destination_canonical_revision: SharedStr,
    /// Destination namespace.
    pub destination_workload_namespace: SharedStr,
    /// Destination identity.
    pub destination_principal: SharedStr,
    /// Destination app.
    pub destination_app: SharedStr,
    /// Destination version.
    pub destination_version: SharedStr,
    /// Destination cluster.
    pub destination_cluster: SharedStr,
}

/// `unknown`, shared.
static UNKNOWN: std::sync::LazyLock<SharedStr> =
    std::sync::LazyLock::new(|| SharedStr::from("unknown"));

/// `unknown` for empty values, as ztunnel encodes them; a state string is shared, not copied.
fn val(s: &SharedStr) -> SharedStr {
    if s.is_empty() {
        UNKNOWN.clone()
    } else {
        s.clone()
    }
}

/// [`val`] for a string the state does not share (service names, locality parts).
fn val_str(s: &str) -> SharedStr {
    if s.is_empty() {
        UNKNOWN.clone()
    } else {
        SharedStr::from(s)
    }
}

/// Label values are written as the strings they hold.
impl EncodeLabelValue for SharedStr {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl PeerLabels {
    /// The source and destination workloads when the state knows them, the peer identity from mTLS
    /// (`None` for plaintext), and the service addressed if any; empty values read `unknown`.
    pub fn new(
        src: Option<&Workload>,
        src_identity: Option<&Identity>,
        dst: Option<&Workload>,
        dst_service: Option<&Service>,
    ) -> PeerLabels {
        let s = |f: fn(&Workload) -> &SharedStr| src.map_or_else(|| UNKNOWN.clone(), |w| val(f(w)));
        let d = |f: fn(&Workload) -> &SharedStr| dst.map_or_else(|| UNKNOWN.clone(), |w| val(f(w)));
        let svc = |f: fn(&Service) -> &str| val_str(dst_service.map(f).unwrap_or(""));
        PeerLabels {
            source_workload: s(|w| workload_name(w)),
            source_canonical_service: s(|w| &w.canonical_name),
            source_canonical_revision: s(|w| &w.canonical_revision),
            source_workload_namespace: s(|w| &w.namespace),
            source_principal: src_identity
                .map_or_else(|| UNKNOWN.clone(), |i| i.to_string().into()),
            source_app: s(|w| app_name(w)),
            source_version: s(|w| &w.canonical_revision),
            source_cluster: s(|w| &w.cluster_id),
            destination_service: svc(|s| &s.hostname),
            destination_service_namespace: svc(|s| &s.namespace),
            destination_service_name: svc(|s| &s.name),
            destination_workload: d(|w| workload_name(w)),
            destination_canonical_service: d(|w| &w.canonical_name),
            destination_canonical_revision: d(|w| &w.canonical_revision),
            destination_workload_namespace: d(|w| &w.namespace),
            destination_principal: dst
                .map_or_else(|| UNKNOWN.clone(), |w| w.identity.to_string().into()),
            destination_app: d(|w| app_name(w)),
            destination_version: d(|w| &w.canonical_revision),
            destination_cluster: d(|w| &w.cluster_id),
        }
    }
}

impl TrafficLabels {
    /// Labels for a connection seen by `reporter` (see [`PeerLabels::new`]).
    pub fn new(
        reporter: Reporter,
        src: Option<&Workload>,
        src_identity: Option<&Identity>,
        dst: Option<&Workload>,
        dst_service: Option<&Service>,
    ) -> TrafficLabels {
        TrafficLabels {
            reporter,
            peer: PeerLabels::new(src, src_identity, dst, dst_service),
            request_protocol: "tcp",
            response_flags: ResponseFlags::None,
            connection_security_policy: if src_identity.is_some() {
                SecurityPolicy::mutual_tls
            } else {
                SecurityPolicy::unknown
            },
            locality: LocalityLabels::new(src, dst),
        }
    }
}

/// The owner's name when known, else the pod's.
fn workload_name(w: &Workload) -> &SharedStr {
    if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    }
}

/// The canonical name when known, else the workload name (ztunnel's `source_app`).
fn app_name(w: &Workload) -> &SharedStr {
    if w.canonical_name.is_empty() {
        workload_name(w)
    } else {
        &w.canonical_name
    }
}

/// Why a waypoint could not be used (the `reason` label of `meshnode_waypoint_unavailable_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The label values are these names.
pub enum WaypointFailure {
    /// No service or workload in the state answers to the waypoint's address or hostname.
    not_found,
    /// The waypoint's service has no endpoint able to take the connection.
    no_endpoint,
    /// The waypoint workload has no address to dial.
    no_address,
    /// The waypoint workload is on another network (double HBONE is not supported).
    other_network,
    /// The HBONE connection to the waypoint failed (connect, TLS, identity, CONNECT answer).
    unreachable,
}

impl From<&crate::state::WaypointError> for WaypointFailure {
    fn from(e: &crate::state::WaypointError) -> Self {
        use crate::state::WaypointError as E;
        match e {
            E::NotFound => WaypointFailure::not_found,
            E::NoEndpoint => WaypointFailure::no_endpoint,
            E::NoAddress => WaypointFailure::no_address,
            E::OtherNetwork { .. } => WaypointFailure::other_network,
        }
    }
}

/// Which binding sent the connection to the waypoint (the `binding` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The label values are these names.
pub enum WaypointBinding {
    /// The service the application addressed (by VIP) has the waypoint.
    service,
    /// The workload the application addressed (by pod IP) has the waypoint.
    workload,
}

/// Labels of `meshnode_waypoint_unavailable_total`. ztunnel has no metric for this (it logs the early
/// deny and counts nothing), so the set is ours, chosen to say what to fix while staying small:
/// `waypoint` names the broken waypoint (a `namespace/hostname` or `network/ip`: one per waypoint
/// deployment, so a handful per mesh), `binding` whether a service or a workload named it, `reason`
/// one of five fixed values. The source and the addressed service are left out — they are in the log
/// line of each refusal and would multiply the series by every client and service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WaypointLabels {
    /// The waypoint as named in the state (`namespace/hostname` or `network/ip`).
    pub waypoint: String,
    /// Service or workload binding.
    pub binding: WaypointBinding,
    /// Why it could not be used.
    pub reason: WaypointFailure,
}

impl WaypointLabels {
    /// The labels for waypoint `gw`, bound through `binding`, unusable for `reason`.
    pub fn new(
        gw: &GatewayAddress,
        binding: WaypointBinding,
        reason: WaypointFailure,
    ) -> WaypointLabels {
        let waypoint = match &gw.destination {
            GatewayDestination::Address { network, ip } => format!("{network}/{ip}"),
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => format!("{namespace}/{hostname}"),
        };
        WaypointLabels {
            waypoint,
            binding,
            reason,
        }
    }
}

/// The label set of `istio_tcp_sockets_open`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReporterLabel {
    reporter: Reporter,
}

/// The TCP families.
#[derive(Debug, Default)]
struct Tcp {
    sockets_open: Family<ReporterLabel, Gauge>,
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
    received_bytes: Family<TrafficLabels, Counter>,
    sent_bytes: Family<TrafficLabels, Counter>,
}

/// The process's metrics: one registry, shared by every proxy (`Arc`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tcp: Tcp,
    waypoint_unavailable: Family<WaypointLabels, Counter>,
    xds: XdsMetrics,
    dns: DnsMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// ztunnel's in-pod workload manager families (shared mode only), as its Istio dashboard reads them.
#[derive(Debug, Clone, Default)]
pub struct WorkloadManagerMetrics {
    /// Pods whose proxy is serving.
    pub active: Gauge,
    /// Pods handed over whose proxy has not started (retried).
    pub pending: Gauge,
    /// Pod proxies started.
    pub started: Counter,
    /// Pod proxies drained (pod removed or replaced).
    pub stopped: Counter,
}

/// `istio_xds_message*`'s label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UrlLabel {
    url: String,
}

/// `istio_xds_connection_terminations`' label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why an xDS stream ended, as ztunnel labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdsTermination {
    /// The server ended the stream cleanly.
    Complete,
    /// A routine end (the server or a proxy closed it; reconnected at once).
    Reconnect,
    /// The stream could not be opened.
    ConnectionError,
    /// It failed after it was opened.
    Error,
}

/// The xDS client's families (ztunnel's `istio_xds_*`); cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct XdsMetrics {
    messages: Family<UrlLabel, Counter>,
    message_bytes: Family<UrlLabel, Counter>,
    terminations: Family<ReasonLabel, Counter>,
}

impl XdsMetrics {
    /// One response of type `url`, `bytes` long once encoded.
    pub fn message(&self, url: &str, bytes: u64) {
        let label = UrlLabel { url: url.into() };
        self.messages.get_or_create(&label).inc();
        self.message_bytes.get_or_create(&label).inc_by(bytes);
    }

    /// A stream ended.
    pub fn terminated(&self, why: XdsTermination) {
        let reason = match why {
            XdsTermination::Complete => "Complete",
            XdsTermination::Reconnect => "Reconnect",
            XdsTermination::ConnectionError => "ConnectionError",
            XdsTermination::Error => "Error",
        };
        self.terminations
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// The DNS families' labels (ztunnel's): the query type in lower case (`a`, `aaaa`, `mx`, …), `udp` or
/// `tcp`, and the client workload's canonical service and revision (`unknown` when not known).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    request_query_type: String,
    request_protocol: &'static str,
    source_canonical_service: SharedStr,
    source_canonical_revision: SharedStr,
}

impl DnsLabels {
    /// Labels for a query of `query_type` (its mnemonic; empty: unknown) over `protocol`, from `client`.
    pub fn new(query_type: &str, protocol: &'static str, client: Option<&Workload>) -> DnsLabels {
        let or_unknown = |s: Option<&SharedStr>| match s {
            Some(s) if !s.is_empty() => s.clone(),
            _ => SharedStr::from("unknown"),
        };
        DnsLabels {
            request_query_type: if query_type.is_empty() {
                "unknown".into()
            } else {
                query_type.to_ascii_lowercase()
            },
            request_protocol: protocol,
            source_canonical_service: or_unknown(client.map(|w| &w.canonical_name)),
            source_canonical_revision: or_unknown(client.map(|w| &w.canonical_revision)),
        }
    }
}

/// The DNS proxy's families (ztunnel's `istio_dns_*`); cheap to clone (shared handles).
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    requests: Family<DnsLabels, Counter>,
    upstream_requests: Family<DnsLabels, Counter>,
    upstream_failures: Family<DnsLabels, Counter>,
    upstream_duration: Family<DnsLabels, Histogram>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(|| {
                Histogram::new([0.0005, 0.001, 0.01, 0.1, 1.0, 5.0])
            }),
        }
    }
}

impl DnsMetrics {
    /// A query answered by the proxy itself.
    pub fn answered(&self, labels: &DnsLabels) {
        self.requests.get_or_create(labels).inc();
    }

    /// A query forwarded upstream: how long it took, and whether it got an answer.
    pub fn forwarded(&self, labels: &DnsLabels, took: std::time::Duration, ok: bool) {
        self.upstream_requests.get_or_create(labels).inc();
        if ok {
            self.upstream_duration
                .get_or_create(labels)
                .observe(took.as_secs_f64());
        } else {
            self.upstream_failures.get_or_create(labels).inc();
        }
    }
}

/// `istio_build`'s labels: the role (ztunnel's name for the node proxy) and the version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
}

/// Registers `istio_build{component, tag}` = 1 in `istio` (a registry prefixed `istio`): `ztunnel` for the
/// node proxy, `proxy` for a waypoint (what pilot-agent reports for Istio's Envoy proxies).
pub fn register_build(istio: &mut Registry, component: &str) {
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            component: component.into(),
            tag: env!("CARGO_PKG_VERSION").into(),
        })
        .set(1);
    istio.register("build", "Istio component build info", build);
}

impl Metrics {
    /// A registry with the `istio_tcp_*` families registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let tcp = Tcp::default();
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            tcp.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            tcp.closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed to establish or were closed abnormally",
            tcp.failed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            tcp.received_bytes.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            tcp.sent_bytes.clone(),
        );
        istio.register(
            "tcp_sockets_open",
            "The current number of open TCP connections (unstable)",
            tcp.sockets_open.clone(),
        );
        register_build(istio, "ztunnel");
        let xds = XdsMetrics::default();
        istio.register(
            "xds_message",
            "Total number of messages received",
            xds.messages.clone(),
        );
        istio.register(
            "xds_message_bytes",
            "Total number of bytes received",
            xds.message_bytes.clone(),
        );
        istio.register(
            "xds_connection_terminations",
            "The total number of completed connections to xds server",
            xds.terminations.clone(),
        );
        let dns = DnsMetrics::default();
        istio.register(
            "dns_requests",
            "DNS queries the proxy answered itself",
            dns.requests.clone(),
        );
        istio.register(
            "dns_upstream_requests",
            "DNS queries forwarded to the upstream resolvers",
            dns.upstream_requests.clone(),
        );
        istio.register(
            "dns_upstream_failures",
            "DNS queries the upstream resolvers did not answer",
            dns.upstream_failures.clone(),
        );
        istio.register_with_unit(
            "dns_upstream_request_duration",
            "Time the upstream resolvers took to answer a forwarded DNS query",
            prometheus_client::registry::Unit::Seconds,
            dns.upstream_duration.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        let waypoint_unavailable = Family::<WaypointLabels, Counter>::default();
        registry.sub_registry_with_prefix("meshnode").register(
            "waypoint_unavailable",
            "Outbound connections refused because the waypoint they must pass was missing, unresolvable or unreachable",
            waypoint_unavailable.clone(),
        );
        Metrics {
            registry,
            tcp,
            waypoint_unavailable,
            xds,
            dns,
        }
    }

    /// A registry that also has the in-pod workload manager's families (shared mode), and their handles.
    pub fn with_workload_manager() -> (Metrics, WorkloadManagerMetrics) {
        let mut m = Metrics::new();
        let w = WorkloadManagerMetrics::default();
        let reg = m.registry.sub_registry_with_prefix("workload_manager");
        reg.register(
            "active_proxy_count",
            "The total number current workloads with active proxies",
            w.active.clone(),
        );
        reg.register(
            "pending_proxy_count",
            "The total number current workloads with pending proxies",
            w.pending.clone(),
        );
        reg.register(
            "proxies_started",
            "The total number of proxies that were started",
            w.started.clone(),
        );
        reg.register(
            "proxies_stopped",
            "The total number of proxies that were stopped",
            w.stopped.clone(),
        );
        (m, w)
    }

    /// The xDS client's families.
    pub fn xds(&self) -> XdsMetrics {
        self.xds.clone()
    }

    /// The DNS proxy's families.
    pub fn dns(&self) -> &DnsMetrics {
        &self.dns
    }

    /// Counts a connection refused because its waypoint could not be used.
    pub fn waypoint_unavailable(&self, labels: &WaypointLabels) {
        self.waypoint_unavailable.get_or_create(labels).inc();
    }

    /// The registry, for encoding.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a connection as opened (and open); the returned record counts its close.
    pub fn open(self: &Arc<Self>, labels: TrafficLabels) -> ConnectionRecord {
        self.tcp.opened.get_or_create(&labels).inc();
        // The gauge handle is kept (an `Arc` clone) so the close is one atomic decrement, no lookup.
        let open = self
            .tcp
            .sockets_open
            .get_or_create(&ReporterLabel {
                reporter: labels.reporter,
            })
            .clone();
        open.inc();
        ConnectionRecord {
            metrics: self.clone(),
            labels: Some(labels),
            open,
            live: false,
        }
    }
}

/// One open connection's metrics; [`close`](Self::close) records its end. Dropped without closing
/// (the task was cancelled), it records a close with no bytes and no flag.
#[derive(Debug)]
pub struct ConnectionRecord {
    metrics: Arc<Metrics>,
    labels: Option<TrafficLabels>,
    /// This reporter's `istio_tcp_sockets_open`, decremented once at close.
    open: Gauge,
    /// The bytes are counted as they move ([`live_bytes`](Self::live_bytes)), not at close.
    live: bool,
}

/// A connection's two byte counters, added to as the bytes are copied.
#[derive(Debug, Clone)]
pub struct LiveBytes {
    /// `istio_tcp_received_bytes_total`: from the initiator towards the server.
    pub received: Counter,
    /// `istio_tcp_sent_bytes_total`: from the server towards the initiator.
    pub sent: Counter,
}

impl ConnectionRecord {
    /// The connection's labels until it is closed: what its access line reports (no second lookup).
    pub fn labels(&self) -> Option<&TrafficLabels> {
        self.labels.as_ref()
    }

    /// The byte counters of this connection's labels, for the copy to add to as bytes move; from then on
    /// [`close`](Self::close) no longer adds the totals it is given.
    pub fn live_bytes(&mut self) -> Option<LiveBytes> {
        let labels = self.labels.as_ref()?;
        self.live = true;
        let tcp = &self.metrics.tcp;
        Some(LiveBytes {
            received: tcp.received_bytes.get_or_create(labels).clone(),
            sent: tcp.sent_bytes.get_or_create(labels).clone(),
        })
    }

    /// Records the end: `received` bytes from the initiator, `sent` towards it (unless they were counted
    /// live), and why it failed.
    pub fn close(mut self, flags: ResponseFlags, received: u64, sent: u64) {
        self.record(flags, received, sent);
    }

    fn record(&mut self, flags: ResponseFlags, received: u64, sent: u64) {
        let Some(mut labels) = self.labels.take() else {
            return;
        };
        self.open.dec();
        labels.response_flags = flags;
        let tcp = &self.metrics.tcp;
        tcp.closed.get_or_create(&labels).inc();
        if flags != ResponseFlags::None {
            tcp.failed.get_or_create(&labels).inc();
        }
        if self.live {
            return;
        }
        if received > 0 {
            tcp.received_bytes.get_or_create(&labels).inc_by(received);
        }
        if sent > 0 {
            tcp.sent_bytes.get_or_create(&labels).inc_by(sent);
        }
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        self.record(ResponseFlags::None, 0, 0);
    }
}

#[cfg(test)]
mod tests;
