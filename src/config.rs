//! Typed configuration for the proxy role, built once at start-up and passed down.
//!
//! Input: environment variables with ztunnel's names (so meshnode can replace ztunnel in an Istio install
//! unchanged), read through the [`Source`] trait so tests can inject a map instead of touching the process
//! environment. Output: one [`Config`] value; every bad value is refused with the variable's name.
//! The waypoint role's configuration ([`WaypointConfig`], in [`waypoint`]) and the east-west gateway's
//! ([`GatewayConfig`], in [`gateway`]) are built on the same one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub mod gateway;
pub mod vars;
pub mod waypoint;
pub use gateway::GatewayConfig;
pub use waypoint::WaypointConfig;

crate::config::vars::declare! { PROXY_VARS:
/// `shared` (in-pod, via ZDS) or `dedicated` (one workload, this network namespace).
PROXY_MODE = "shared";
/// The CNI agent's ZDS socket (shared mode).
INPOD_UDS = "/var/run/ztunnel/ztunnel.sock";
/// SO_REUSEPORT on in-pod listeners, so a new proxy can bind while the old one drains.
INPOD_PORT_REUSE = "true";
/// `namespace/name/service-account` of the workload a dedicated proxy acts for.
PROXY_WORKLOAD_INFO = "";
/// Path of a ztunnel-format local config file (workloads, services, policies).
LOCAL_XDS_PATH = "";
/// The same content inline.
LOCAL_XDS = "";
/// istiod's xDS address; set to the empty string to run without xDS.
XDS_ADDRESS = "https://istiod.istio-system.svc:15012";
/// The CA's address (istiod's by default; empty: certificates from a local CA).
CA_ADDRESS = "XDS_ADDRESS, or a local CA without xDS";
/// Roots to verify the xDS server: a file path, `SYSTEM`, or PEM text.
XDS_ROOT_CA = "./var/run/secrets/istio/root-cert.pem";
/// Roots to verify the CA server: a file path, `SYSTEM`, or PEM text. A file or PEM text is also the mesh's
/// root bundle, trusted for workload peers together with each CA answer's roots (the file re-read when it
/// changes; see `identity::TrustBundle`).
CA_ROOT_CA = "./var/run/secrets/istio/root-cert.pem";
/// Another name the xDS server's certificate may carry.
ALT_XDS_HOSTNAME = "";
/// Another name the CA server's certificate may carry.
ALT_CA_HOSTNAME = "";
/// The bearer token for istiod: a file path (re-read on every request) or a literal token.
AUTH_TOKEN = "./var/run/secrets/tokens/istio-token if present";
/// Cluster id, preferred over `CLUSTER_ID` (Istio's proxy metadata name).
ISTIO_META_CLUSTER_ID = "";
/// This proxy's own pod name (xDS node id and metadata).
POD_NAME = "";
/// This proxy's own namespace.
POD_NAMESPACE = "";
/// This proxy's own service account.
SERVICE_ACCOUNT = "";
/// This proxy's own IP (xDS node id).
INSTANCE_IP = "";
/// Prefix of proxy metadata variables (`ISTIO_META_FOO=bar` → metadata `FOO: "bar"`).
ISTIO_META_PREFIX as "ISTIO_META_" = "";
/// Prefix of JSON proxy metadata variables (`ISTIO_METAJSON_FOO={...}` → metadata `FOO: {...}`).
ISTIO_METAJSON_PREFIX as "ISTIO_METAJSON_" = "";
/// Prefix of extra gRPC metadata for xDS requests (`XDS_HEADER_X=v` → `x: v`).
XDS_HEADER_PREFIX as "XDS_HEADER_" = "";
/// Prefix of extra gRPC metadata for CA requests.
CA_HEADER_PREFIX as "CA_HEADER_" = "";
/// SO_MARK put on every socket the proxy opens, so capture rules skip them.
PACKET_MARK = "1337";
/// Keep the client's source address towards the application (`true`/`false`; unset: automatic).
ENABLE_ORIG_SRC = "on in shared mode";
/// The Kubernetes node this proxy runs on.
NODE_NAME = "";
/// The local network name (multi-network meshes).
NETWORK = "";
/// Cluster id sent to the control plane.
CLUSTER_ID = "Kubernetes";
/// Directory with an istiod plug-in CA (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`).
CA_CERTS_DIR = "";
/// Requested workload certificate lifetime.
SECRET_TTL = "24h";
/// Whether to listen on IPv6 too.
IPV6_ENABLED = "true";
/// Most streams multiplexed on one pooled HBONE connection.
POOL_MAX_STREAMS_PER_CONNECTION = "100";
/// How long an unused pooled HBONE connection is kept.
POOL_UNUSED_RELEASE_TIMEOUT = "5m";
/// HTTP/2 stream flow-control window.
HTTP2_STREAM_WINDOW_SIZE = "4194304";
/// HTTP/2 connection flow-control window.
HTTP2_CONNECTION_WINDOW_SIZE = "16777216";
/// HTTP/2 maximum frame size.
HTTP2_FRAME_SIZE = "1048576";
/// How long open connections may finish after shutdown starts.
CONNECTION_TERMINATION_DEADLINE = "5s";
/// The pod's `terminationGracePeriodSeconds` (downward API): without an explicit
/// `CONNECTION_TERMINATION_DEADLINE`, the drain deadline is set a little inside it, as ztunnel does.
TERMINATION_GRACE_PERIOD_SECONDS = "";
/// Data-plane worker threads (`N`, or `0` for one per CPU).
ZTUNNEL_WORKER_THREADS = "2";
/// meshnode's own: where the built-in CA keeps its root, shared by every meshnode process on the machine.
MESHNODE_STATE_DIR = "/var/lib/meshnode";
/// meshnode's own: most connections handled at once per listener.
MESHNODE_MAX_CONNECTIONS = "65536";
/// meshnode's own: most connections handled at once by the whole process (every listener of every pod).
MESHNODE_MAX_CONNECTIONS_TOTAL = "65536";
/// meshnode's own: most connections from one source address still in their handshake on :15008.
MESHNODE_MAX_HANDSHAKES_PER_SOURCE = "256";
/// meshnode's own: time allowed from accepting an HBONE connection to its HTTP/2 preface (TLS included).
MESHNODE_HANDSHAKE_TIMEOUT = "10s";
/// meshnode's own: an inbound HBONE connection carrying no stream for this long is closed (GOAWAY).
MESHNODE_HBONE_IDLE_TIMEOUT = "10m";
/// meshnode's own: offer and accept resumable HBONE streams between meshnode proxies, so an application
/// connection outlives the HBONE connection under it (its tunnel is re-dialled and carries on from the
/// byte where it stopped). Off by default while its cost is measured; ztunnel peers are unaffected.
MESHNODE_RESUMABLE_STREAMS = "false";
/// meshnode's own: how long a resumable stream whose tunnel broke waits for the re-dial (server) or keeps
/// re-dialling (client) before its application connection is closed.
MESHNODE_RESUME_WAIT = "10s";
/// meshnode's own: the unix socket through which an upgrade hands open connections from the old proxy
/// process to the new one (the new one listens once ready; the old one, told to stop, hands over its
/// resumable streams there). Empty: none (connections drain at shutdown, as ztunnel's).
MESHNODE_HANDOVER_SOCKET = "";
/// meshnode's own: the readiness port (ztunnel's fixed 15021). Moved only where two node proxies share a
/// network namespace during an upgrade (the sandbox's nodes); a pod has its own.
MESHNODE_READINESS_PORT = "15021";
/// meshnode's own: the Prometheus port (ztunnel's fixed 15020); see `MESHNODE_READINESS_PORT`.
MESHNODE_METRICS_PORT = "15020";
/// TCP keepalive: idle time before the first probe (ztunnel's name and default).
KEEPALIVE_TIME = "180s";
/// TCP keepalive: time between probes.
KEEPALIVE_INTERVAL = "180s";
/// TCP keepalive: unanswered probes before the connection is dropped.
KEEPALIVE_RETRIES = "9";
/// TCP keepalive on the proxy's sockets at all.
KEEPALIVE_ENABLED = "true";
/// TCP_USER_TIMEOUT = keepalive time + retries × interval: unacknowledged data cannot hold a socket longer.
USER_TIMEOUT_ENABLED = "false";
/// Istio's ProxyConfig (YAML or JSON), as ztunnel reads it: only `proxyAdminPort` (the admin API's port on
/// localhost, default 15000) is used here.
PROXY_CONFIG = "";
/// The cluster's DNS domain (service hostnames are `<name>.<namespace>.svc.<domain>`), for the DNS proxy.
CLUSTER_DOMAIN = "cluster.local";
/// The DNS proxy's choice among services of one hostname in several namespaces, after the client's own
/// namespace (ztunnel's spelling).
PREFERED_SERVICE_NAMESPACE = "";
/// meshnode's own: the resolv.conf whose name servers get the DNS queries the mesh does not answer
/// (ztunnel reads its own `/etc/resolv.conf`; in a cluster, kube-dns).
MESHNODE_DNS_RESOLV_CONF = "/etc/resolv.conf";
}

/// A key → value lookup: the process environment in production, a map in tests.
pub trait Source {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
    /// Every variable (for prefix families such as `ISTIO_META_*`).
    fn all(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
    fn all(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
    fn all(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl Source for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|s| s.to_string())
    }
    fn all(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A variable holds a value that does not parse.
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A variable the chosen mode needs is missing.
    #[error("environment variable {name} is required: {reason}")]
    Missing {
        /// The variable.
        name: &'static str,
        /// Why it is needed.
        reason: &'static str,
    },
    /// Two settings contradict each other.
    #[error("conflicting settings: {0}")]
    Conflict(&'static str),
}

/// How the proxy finds the workloads it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// One proxy per node serving every enrolled pod, handed over by the CNI agent (ZDS).
    Shared,
    /// One proxy for one workload, listening in the current network namespace.
    Dedicated,
}

/// The workload a proxy acts for: ztunnel's `namespace/name/service-account` triple.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadInfo {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Service account.
    pub service_account: String,
}

impl FromStr for WorkloadInfo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split('/').collect::<Vec<_>>().as_slice() {
            [ns, name, sa] if !ns.is_empty() && !name.is_empty() && !sa.is_empty() => {
                Ok(WorkloadInfo {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err("expected namespace/name/service-account".into()),
        }
    }
}

/// Where the workload state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalConfigSource {
    /// No local config.
    None,
    /// A file, re-read when it changes.
    File(PathBuf),
    /// Inline YAML.
    Inline(String),
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// An istiod plug-in CA directory.
    PluginDir(PathBuf),
    /// meshnode's built-in CA, with its root kept under this state directory.
    Builtin(PathBuf),
    /// A remote CA speaking istiod's `IstioCertificateService` (istiod, or `meshnode control-plane`).
    Remote(GrpcTarget),
}

/// Trust roots for a control-plane connection, as ztunnel reads `XDS_ROOT_CA` / `CA_ROOT_CA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCa {
    /// A PEM file (re-read when the connection is rebuilt).
    File(PathBuf),
    /// The operating system's roots.
    System,
    /// PEM text given inline.
    Pem(String),
}

/// The bearer token sent to the control plane, as ztunnel reads `AUTH_TOKEN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthToken {
    /// No `authorization` header.
    None,
    /// A file, re-read on every request (projected service-account tokens rotate).
    File(PathBuf),
    /// A literal token.
    Literal(String),
}

/// A control-plane gRPC endpoint (xDS or CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcTarget {
    /// `https://host:port` (`https://` added when no scheme is given).
    pub address: String,
    /// Roots to verify the server with.
    pub root: RootCa,
    /// Another accepted server name.
    pub alt_hostname: Option<String>,
    /// Extra gRPC metadata (`XDS_HEADER_*` / `CA_HEADER_*`), names lower-cased, `_` → `-`.
    pub headers: Vec<(String, String)>,
}

/// The proxy's own identity as the control plane sees it (xDS node id and metadata).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyMeta {
    /// `POD_NAME`.
    pub pod_name: String,
    /// `POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `SERVICE_ACCOUNT`.
    pub service_account: String,
    /// `INSTANCE_IP`.
    pub instance_ip: Option<std::net::IpAddr>,
    /// `ISTIO_META_*` (prefix stripped, string values) and `ISTIO_METAJSON_*` (parsed JSON).
    pub metadata: std::collections::BTreeMap<String, serde_json::Value>,
}

/// HTTP/2 settings of HBONE connections (both directions).
#[derive(Debug, Clone, Copy)]
pub struct H2Config {
    /// Initial stream window: 4 MiB by default, as ztunnel, so one stream can fill a fast link.
    pub stream_window: u32,
    /// Connection window: 16 MiB, room for several busy streams.
    pub connection_window: u32,
    /// Maximum frame size: 1 MiB, so large writes go out in few frames.
    pub frame_size: u32,
}

/// Connection pool settings.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Streams per HBONE connection before another is opened (ztunnel default 100).
    pub max_streams_per_connection: u32,
    /// Idle time after which an unused connection is closed (ztunnel default 5 minutes).
    pub unused_release_timeout: Duration,
}

/// TCP keepalive on the proxy's sockets, read from ztunnel's variables with ztunnel's defaults.
///
/// Keepalive is not hop-by-hop: an application's own keepalive only reaches its local proxy, so the proxy
/// probes on its sockets to keep idle connections from being dropped by middleboxes (ztunnel's reasoning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// SO_KEEPALIVE on (ztunnel default: on).
    pub enabled: bool,
    /// TCP_KEEPIDLE (ztunnel default 180 s: well below the 10-minute idle timeouts of common load balancers).
    pub time: Duration,
    /// TCP_KEEPINTVL (ztunnel default 180 s).
    pub interval: Duration,
    /// TCP_KEEPCNT (ztunnel default 9, Linux's own default).
    pub retries: u32,
    /// TCP_USER_TIMEOUT set to `time + retries × interval` (ztunnel default: off, not yet proven there).
    pub user_timeout: bool,
}

impl Keepalive {
    /// The TCP_USER_TIMEOUT this setting implies, when enabled.
    pub fn user_timeout(&self) -> Option<Duration> {
        self.user_timeout
            .then(|| self.time + self.interval * self.retries)
    }
}

/// Listener addresses of the proxy.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Outbound capture (ztunnel: 15001, fixed).
    pub outbound: u16,
    /// Plaintext inbound capture (15006).
    pub inbound_plaintext: u16,
    /// HBONE inbound (15008).
    pub inbound: u16,
    /// Readiness (15021).
    pub readiness: u16,
    /// Prometheus metrics (15020, ztunnel's stats port).
    pub metrics: u16,
    /// The admin API (15000, on localhost only; `PROXY_CONFIG`'s `proxyAdminPort`, as ztunnel).
    pub admin: u16,
}

impl Ports {
    /// Ports the proxy refuses to forward to on loopback or inbound: forwarding there would loop.
    pub fn illegal(&self) -> [u16; 3] {
        [self.outbound, self.inbound_plaintext, self.inbound]
    }
}

/// Everything the proxy role needs, parsed and validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Shared or dedicated.
    pub proxy_mode: ProxyMode,
    /// The workload of a dedicated proxy.
    pub workload_info: Option<WorkloadInfo>,
    /// Local workload/service/policy state.
    pub local_config: LocalConfigSource,
    /// The xDS server, when xDS is used (`XDS_ADDRESS`, default istiod; empty: none).
    pub xds: Option<GrpcTarget>,
    /// The token sent to the xDS server and the CA.
    pub auth_token: AuthToken,
    /// The proxy's own pod, for the xDS node.
    pub proxy_meta: ProxyMeta,
    /// SO_MARK for every socket the proxy opens.
    pub packet_mark: Option<u32>,
    /// Keep the original client address towards applications.
    pub enable_orig_src: Option<bool>,
    /// This node's name.
    pub node_name: Option<String>,
    /// This proxy's network.
    pub network: String,
    /// The cluster id.
    pub cluster_id: String,
    /// Certificate source.
    pub ca: CaSource,
    /// Workload certificate lifetime.
    pub secret_ttl: Duration,
    /// Listen on IPv6 as well as IPv4.
    pub ipv6_enabled: bool,
    /// Listener ports.
    pub ports: Ports,
    /// Pool settings.
    pub pool: PoolConfig,
    /// HTTP/2 settings.
    pub h2: H2Config,
    /// Upstream TCP connect timeout (ztunnel: 10 s).
    pub connect_timeout: Duration,
    /// TLS + HTTP/2 handshake timeout on inbound connections, so a silent peer cannot hold a slot.
    pub handshake_timeout: Duration,
    /// An inbound HBONE connection with no stream for this long is closed.
    pub hbone_idle_timeout: Duration,
    /// Offer and accept resumable streams (meshnode peers; `hbone::resume`).
    pub resumable_streams: bool,
    /// How long a broken resumable stream waits for, or keeps trying, its resume.
    pub resume_wait: Duration,
    /// Where an upgrade hands resumable connections from the old process to the new one; `None`: not.
    pub handover_socket: Option<PathBuf>,
    /// Drain deadline at shutdown.
    pub termination_deadline: Duration,
    /// Connections handled at once per listener; further ones wait in the kernel backlog.
    pub max_connections: usize,
    /// Connections handled at once by the whole process; further ones wait in the kernel backlog.
    pub max_connections_total: usize,
    /// Unauthenticated (mid-handshake) connections from one source address at once on :15008; more are reset.
    pub max_handshakes_per_source: usize,
    /// TCP keepalive on accepted and outgoing sockets.
    pub keepalive: Keepalive,
    /// Not a setting: the process-wide admission counters behind `max_connections_total` and
    /// `max_handshakes_per_source`. It lives here because the `Arc<Config>` is the one value every proxy
    /// of the process shares (in shared mode, each pod's proxy gets a clone of the same `Arc`); clones of
    /// a `Config` share it too.
    pub admission: std::sync::Arc<crate::proxy::limits::Admission>,
    /// Data-plane worker threads.
    pub worker_threads: usize,
    /// How often the local config file is checked for changes.
    pub local_config_poll: Duration,
    /// The CNI agent's ZDS socket (shared mode).
    pub inpod_uds: PathBuf,
    /// SO_REUSEPORT on in-pod listeners.
    pub inpod_port_reuse: bool,
    /// The DNS proxy.
    pub dns: DnsConfig,
}

/// The DNS proxy each pod gets (ztunnel's): on unless the proxy metadata `DNS_CAPTURE`
/// (`ISTIO_META_DNS_CAPTURE`) says otherwise; pods send it DNS only when their capture rules redirect
/// port 53 (the CNI agent's `AMBIENT_DNS_CAPTURE`, or the pod's annotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Serve DNS at all.
    pub enabled: bool,
    /// Where, inside each pod (`ISTIO_META_DNS_PROXY_ADDR`: `localhost:PORT` or `IP:PORT`).
    pub bind: DnsBind,
    /// `CLUSTER_DOMAIN`.
    pub cluster_domain: String,
    /// `PREFERED_SERVICE_NAMESPACE`.
    pub preferred_namespace: Option<String>,
    /// `MESHNODE_DNS_RESOLV_CONF`.
    pub resolv_conf: PathBuf,
}

/// [`DnsConfig::bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsBind {
    /// 127.0.0.1 and, when IPv6 is on and the pod has it, ::1 (ztunnel's default, port 15053).
    Localhost(u16),
    /// One address.
    Addr(SocketAddr),
}

/// ztunnel's DNS proxy port.
pub const DEFAULT_DNS_PORT: u16 = 15053;

fn dns_config(src: &dyn Source, meta: &ProxyMeta) -> Result<DnsConfig, Error> {
    let text = |key: &str| match meta.metadata.get(key) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
        None => None,
    };
    let bind = match text("DNS_PROXY_ADDR") {
        None => DnsBind::Localhost(DEFAULT_DNS_PORT),
        Some(a) => match a.strip_prefix("localhost:") {
            Some(port) => DnsBind::Localhost(port.parse().map_err(|_| {
                invalid(
                    "ISTIO_META_DNS_PROXY_ADDR",
                    &a,
                    "expected localhost:PORT or IP:PORT",
                )
            })?),
            None => DnsBind::Addr(a.parse().map_err(|_| {
                invalid(
                    "ISTIO_META_DNS_PROXY_ADDR",
                    &a,
                    "expected localhost:PORT or IP:PORT",
                )
            })?),
        },
    };
    Ok(DnsConfig {
        // On unless set to something other than true (ztunnel's rule).
        enabled: text("DNS_CAPTURE").is_none_or(|v| v.eq_ignore_ascii_case("true")),
        bind,
        cluster_domain: src
            .get(CLUSTER_DOMAIN)
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or_else(|| "cluster.local".into()),
        preferred_namespace: src
            .get(PREFERED_SERVICE_NAMESPACE)
            .filter(|s| !s.is_empty()),
        resolv_conf: src
            .get(MESHNODE_DNS_RESOLV_CONF)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/etc/resolv.conf".into())
            .into(),
    })
}

impl Config {
    /// Reads the configuration from `src`.
    pub fn from_source(src: &dyn Source) -> Result<Config, Error> {
        let proxy_mode = match src.get(PROXY_MODE).as_deref() {
            None | Some("shared") => ProxyMode::Shared,
            Some("dedicated") => ProxyMode::Dedicated,
            Some(other) => {
                return Err(invalid(PROXY_MODE, other, "expected shared or dedicated"));
            }
        };
        let workload_info = parse_opt::<WorkloadInfo>(src, PROXY_WORKLOAD_INFO)?;
        if proxy_mode == ProxyMode::Dedicated && workload_info.is_none() {
            return Err(Error::Missing {
                name: PROXY_WORKLOAD_INFO,
                reason:
                    "dedicated mode acts for exactly one workload (namespace/name/service-account)",
            });
        }
        let local_config = match (src.get(LOCAL_XDS_PATH), src.get(LOCAL_XDS)) {
            (Some(_), Some(_)) => {
                return Err(Error::Conflict(
                    "LOCAL_XDS_PATH and LOCAL_XDS are mutually exclusive",
                ))
            }
            (Some(p), None) if !p.is_empty() => LocalConfigSource::File(p.into()),
            (None, Some(y)) if !y.is_empty() => LocalConfigSource::Inline(y),
            _ => LocalConfigSource::None,
        };
        let xds = match src.get(XDS_ADDRESS) {
            None => Some(DEFAULT_ISTIOD.to_string()),
            Some(a) if a.trim().is_empty() => None,
            Some(a) => Some(a.trim().to_string()),
        }
        .map(|address| {
            grpc_target(
                src,
                &address,
                XDS_ROOT_CA,
                ALT_XDS_HOSTNAME,
                XDS_HEADER_PREFIX,
            )
        })
        .transpose()?;
        let packet_mark = match src.get(PACKET_MARK) {
            None => Some(DEFAULT_PACKET_MARK),
            Some(v) if v.is_empty() => None,
            Some(v) => Some(parse_value(PACKET_MARK, &v)?),
        };
        let remote_ca = match src.get(CA_ADDRESS) {
            Some(a) if !a.trim().is_empty() => Some(a.trim().to_string()),
            Some(_) => None,
            // Unset: istiod's CA when talking to istiod (ztunnel's default), else a local CA.
            None if xds.is_some() && src.get(CA_CERTS_DIR).filter(|s| !s.is_empty()).is_none() => {
                Some(xds.as_ref().map(|x| x.address.clone()).unwrap_or_default())
            }
            None => None,
        };
        let ca = match (remote_ca, src.get(CA_CERTS_DIR).filter(|s| !s.is_empty())) {
            (Some(address), _) => CaSource::Remote(grpc_target(
                src,
                &address,
                CA_ROOT_CA,
                ALT_CA_HOSTNAME,
                CA_HEADER_PREFIX,
            )?),
            (None, Some(dir)) => CaSource::PluginDir(dir.into()),
            (None, None) => CaSource::Builtin(
                src.get(MESHNODE_STATE_DIR)
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
                    .into(),
            ),
        };
        // One listener's default: in shared mode a node's pods together get what one pod's listener could
        // take, so many pods cannot multiply the proxy's sockets and memory.
        let max_connections_total = parse_default(src, MESHNODE_MAX_CONNECTIONS_TOTAL, 65_536)?;
        // A node's burst of new pooled connections fits; one address cannot take every slot with handshakes
        // it never finishes.
        let max_handshakes_per_source =
            parse_default(src, MESHNODE_MAX_HANDSHAKES_PER_SOURCE, 256)?;
        let proxy_meta = proxy_meta(src)?;
        let cfg = Config {
            proxy_mode,
            workload_info,
            local_config,
            xds,
            auth_token: match src.get(AUTH_TOKEN).filter(|s| !s.is_empty()) {
                Some(v) if std::path::Path::new(&v).exists() => AuthToken::File(v.into()),
                Some(v) => AuthToken::Literal(v),
                None if std::path::Path::new(DEFAULT_TOKEN_PATH).exists() => {
                    AuthToken::File(DEFAULT_TOKEN_PATH.into())
                }
                None => AuthToken::None,
            },
            dns: dns_config(src, &proxy_meta)?,
            proxy_meta,
            packet_mark,
            enable_orig_src: parse_opt_bool(src, ENABLE_ORIG_SRC)?,
            node_name: src.get(NODE_NAME).filter(|s| !s.is_empty()),
            network: src.get(NETWORK).unwrap_or_default(),
            cluster_id: src
                .get(ISTIO_META_CLUSTER_ID)
                .filter(|s| !s.is_empty())
                .or_else(|| src.get(CLUSTER_ID).filter(|s| !s.is_empty()))
                .unwrap_or_else(|| "Kubernetes".into()),
            ca,
            secret_ttl: parse_duration(src, SECRET_TTL, Duration::from_secs(24 * 3600))?,
            ipv6_enabled: parse_opt_bool(src, IPV6_ENABLED)?.unwrap_or(true),
            ports: Ports {
                outbound: 15001,
                inbound_plaintext: 15006,
                inbound: 15008,
                readiness: parse_default(src, MESHNODE_READINESS_PORT, 15021)?,
                metrics: parse_default(src, MESHNODE_METRICS_PORT, 15020)?,
                admin: admin_port(src)?,
            },
            pool: PoolConfig {
                max_streams_per_connection: parse_default(
                    src,
                    POOL_MAX_STREAMS_PER_CONNECTION,
                    100,
                )?,
                unused_release_timeout: parse_duration(
                    src,
                    POOL_UNUSED_RELEASE_TIMEOUT,
                    Duration::from_secs(300),
                )?,
            },
            h2: H2Config {
                stream_window: parse_size(src, HTTP2_STREAM_WINDOW_SIZE, 4 << 20)?,
                connection_window: parse_size(src, HTTP2_CONNECTION_WINDOW_SIZE, 16 << 20)?,
                frame_size: parse_size(src, HTTP2_FRAME_SIZE, 1 << 20)?,
            },
            connect_timeout: Duration::from_secs(10),
            // As long as the connect timeout: a slow peer's handshake is not held to a stricter rule.
            handshake_timeout: parse_duration(
                src,
                MESHNODE_HANDSHAKE_TIMEOUT,
                Duration::from_secs(10),
            )?,
            // Twice ztunnel's pool release time (5 min), so well-behaved clients give up their idle
            // connections first and the server's close only catches the ones that never do.
            hbone_idle_timeout: parse_duration(
                src,
                MESHNODE_HBONE_IDLE_TIMEOUT,
                Duration::from_secs(600),
            )?,
            resumable_streams: parse_opt_bool(src, MESHNODE_RESUMABLE_STREAMS)?.unwrap_or(false),
            resume_wait: parse_duration(src, MESHNODE_RESUME_WAIT, Duration::from_secs(10))?,
            handover_socket: src
                .get(MESHNODE_HANDOVER_SOCKET)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            termination_deadline: termination_deadline(src)?,
            max_connections: parse_default(src, MESHNODE_MAX_CONNECTIONS, 65_536)?,
            max_connections_total,
            max_handshakes_per_source,
            keepalive: keepalive(src)?,
            admission: crate::proxy::limits::Admission::new(
                max_connections_total,
                max_handshakes_per_source,
            ),
            worker_threads: match parse_default::<usize>(src, ZTUNNEL_WORKER_THREADS, 2)? {
                0 => std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
                n => n,
            },
            local_config_poll: Duration::from_secs(1),
            inpod_uds: src
                .get(INPOD_UDS)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_INPOD_UDS.into())
                .into(),
            // On by default as in ztunnel: a rolling update starts the new proxy before the old one exits.
            inpod_port_reuse: parse_opt_bool(src, INPOD_PORT_REUSE)?.unwrap_or(true),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.pool.max_streams_per_connection == 0 {
            return Err(invalid(
                POOL_MAX_STREAMS_PER_CONNECTION,
                "0",
                "must be at least 1",
            ));
        }
        if !(16_384..=16_777_215).contains(&self.h2.frame_size) {
            return Err(invalid(
                HTTP2_FRAME_SIZE,
                &self.h2.frame_size.to_string(),
                "HTTP/2 allows 16384..=16777215",
            ));
        }
        // RFC 9113 §6.5.2 / §6.9.1: windows are at most 2^31-1. A zero stream window would let no data
        // move; the connection window starts at 65535 and can only grow (§6.9.2), so less cannot be granted.
        for (name, v, min, why) in [
            (
                HTTP2_STREAM_WINDOW_SIZE,
                self.h2.stream_window,
                1,
                "a zero window lets no data through",
            ),
            (
                HTTP2_CONNECTION_WINDOW_SIZE,
                self.h2.connection_window,
                65_535,
                "HTTP/2 connection windows start at 65535 and cannot shrink",
            ),
        ] {
            if v > (1 << 31) - 1 {
                return Err(invalid(
                    name,
                    &v.to_string(),
                    "HTTP/2 windows are at most 2^31-1",
                ));
            }
            if v < min {
                return Err(invalid(
                    name,
                    &v.to_string(),
                    format!("at least {min}: {why}"),
                ));
            }
        }
        for (name, v) in [
            (MESHNODE_MAX_CONNECTIONS, self.max_connections),
            (MESHNODE_MAX_CONNECTIONS_TOTAL, self.max_connections_total),
            (
                MESHNODE_MAX_HANDSHAKES_PER_SOURCE,
                self.max_handshakes_per_source,
            ),
        ] {
            if v == 0 {
                return Err(invalid(name, "0", "must be at least 1"));
            }
        }
        for (name, v) in [
            (MESHNODE_HANDSHAKE_TIMEOUT, self.handshake_timeout),
            (MESHNODE_HBONE_IDLE_TIMEOUT, self.hbone_idle_timeout),
            (MESHNODE_RESUME_WAIT, self.resume_wait),
        ] {
            if v.is_zero() {
                return Err(invalid(name, "0s", "must be longer than zero"));
            }
        }
        Ok(())
    }

    /// The unspecified address listeners bind to: `[::]` (dual stack) or `0.0.0.0`.
    pub fn wildcard(&self, port: u16) -> SocketAddr {
        if self.ipv6_enabled {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port))
        }
    }
}

/// istiod's address inside a cluster (ztunnel's default for `XDS_ADDRESS` and `CA_ADDRESS`).
pub const DEFAULT_ISTIOD: &str = "https://istiod.istio-system.svc:15012";
/// Where istiod's root certificate is mounted (ztunnel's default for `XDS_ROOT_CA` / `CA_ROOT_CA`).
pub const DEFAULT_ROOT_CA: &str = "./var/run/secrets/istio/root-cert.pem";
/// Where the projected `istio-ca` token is mounted (ztunnel's default for `AUTH_TOKEN`).
pub const DEFAULT_TOKEN_PATH: &str = "./var/run/secrets/tokens/istio-token";

fn grpc_target(
    src: &dyn Source,
    address: &str,
    root_var: &'static str,
    alt_var: &'static str,
    header_prefix: &str,
) -> Result<GrpcTarget, Error> {
    let address = if address.contains("://") {
        address.to_string()
    } else {
        format!("https://{address}")
    };
    let root = match src.get(root_var).filter(|s| !s.trim().is_empty()) {
        None => RootCa::File(DEFAULT_ROOT_CA.into()),
        Some(v) if v.trim() == "SYSTEM" => RootCa::System,
        Some(v) if v.contains("-----BEGIN") => RootCa::Pem(v),
        Some(v) => RootCa::File(v.trim().into()),
    };
    let mut headers: Vec<(String, String)> = src
        .all()
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(header_prefix)
                .filter(|n| !n.is_empty())
                .map(|n| (n.to_ascii_lowercase().replace('_', "-"), v))
        })
        .collect();
    headers.sort();
    Ok(GrpcTarget {
        address,
        root,
        alt_hostname: src.get(alt_var).filter(|s| !s.is_empty()),
        headers,
    })
}

fn proxy_meta(src: &dyn Source) -> Result<ProxyMeta, Error> {
    let mut metadata = std::collections::BTreeMap::new();
    for (k, v) in src.all() {
        if let Some(name) = k.strip_prefix(ISTIO_METAJSON_PREFIX) {
            let value: serde_json::Value =
                serde_json::from_str(&v).map_err(|e| Error::Invalid {
                    name: "ISTIO_METAJSON_*",
                    value: format!("{k}={v}"),
                    reason: e.to_string(),
                })?;
            metadata.insert(name.to_string(), value);
        } else if let Some(name) = k.strip_prefix(ISTIO_META_PREFIX) {
            metadata
                .entry(name.to_string())
                .or_insert(serde_json::Value::String(v));
        }
    }
    Ok(ProxyMeta {
        pod_name: src.get(POD_NAME).unwrap_or_default(),
        pod_namespace: src.get(POD_NAMESPACE).unwrap_or_default(),
        service_account: src.get(SERVICE_ACCOUNT).unwrap_or_default(),
        instance_ip: parse_opt(src, INSTANCE_IP)?,
        metadata,
    })
}

/// ztunnel's packet mark (0x539), which Istio's capture rules skip.
pub const DEFAULT_PACKET_MARK: u32 = 1337;
/// Where istio-cni's node agent (and meshnode's) listens for ZDS.
pub const DEFAULT_INPOD_UDS: &str = "/var/run/ztunnel/ztunnel.sock";
/// Default state directory (built-in CA root).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshnode";

/// The admin port: `proxyAdminPort` of `PROXY_CONFIG` (Istio's ProxyConfig, YAML or JSON; its other fields
/// are not used), else 15000, ztunnel's default.
fn admin_port(src: &dyn Source) -> Result<u16, Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ProxyConfig {
        proxy_admin_port: Option<u16>,
    }
    let Some(raw) = src.get(PROXY_CONFIG).filter(|v| !v.trim().is_empty()) else {
        return Ok(15000);
    };
    let pc: ProxyConfig =
        serde_yaml::from_str(&raw).map_err(|e| invalid(PROXY_CONFIG, &raw, e.to_string()))?;
    Ok(pc.proxy_admin_port.unwrap_or(15000))
}

fn invalid(name: &'static str, value: &str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        name,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn parse_value<T: FromStr>(name: &'static str, v: &str) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    v.trim()
        .parse::<T>()
        .map_err(|e| invalid(name, v, e.to_string()))
}

/// The drain deadline: `CONNECTION_TERMINATION_DEADLINE`, else ztunnel's share of
/// `TERMINATION_GRACE_PERIOD_SECONDS` (5 s less, or 1 s less for 10 s and under, at least 1 s), so that what
/// is left is closed cleanly before Kubernetes' SIGKILL; else 5 s.
fn termination_deadline(src: &dyn Source) -> Result<Duration, Error> {
    if src
        .get(CONNECTION_TERMINATION_DEADLINE)
        .is_some_and(|v| !v.trim().is_empty())
    {
        return parse_duration(src, CONNECTION_TERMINATION_DEADLINE, Duration::from_secs(5));
    }
    Ok(
        match parse_opt::<u64>(src, TERMINATION_GRACE_PERIOD_SECONDS)? {
            Some(secs) => {
                let margin = if secs > 10 { 5 } else { 1 };
                Duration::from_secs(secs.saturating_sub(margin).max(1))
            }
            None => Duration::from_secs(5),
        },
    )
}

fn parse_opt<T: FromStr>(src: &dyn Source, name: &'static str) -> Result<Option<T>, Error>
where
    T::Err: std::fmt::Display,
{
    match src.get(name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => parse_value(name, &v).map(Some),
    }
}

fn parse_default<T: FromStr>(src: &dyn Source, name: &'static str, default: T) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    Ok(parse_opt(src, name)?.unwrap_or(default))
}

fn parse_opt_bool(src: &dyn Source, name: &'static str) -> Result<Option<bool>, Error> {
    match src.get(name).as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Ok(Some(false)),
        Some(v) => Err(invalid(name, v, "expected true or false")),
    }
}

fn parse_duration(
    src: &dyn Source,
    name: &'static str,
    default: Duration,
) -> Result<Duration, Error> {
    match src.get(name) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => duration(&v).map_err(|reason| invalid(name, &v, reason)),
    }
}

/// The longest duration accepted: Go's limit (an int64 of nanoseconds, about 292 years), which ztunnel's
/// parser shares; timers and deadlines built from it stay far from `Instant`'s range.
const MAX_DURATION: Duration = Duration::from_secs(i64::MAX as u64 / 1_000_000_000);

/// Parses Go-style durations as ztunnel accepts them: `500ms`, `10s`, `5m`, `24h`, `1h30m`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err("expected a number, e.g. 10s, 5m, 24h".into());
        }
        let value: f64 = rest[..digits]
            .parse()
            .map_err(|_| "bad number".to_string())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit (ms, s, m or h)".into()),
            u => return Err(format!("unknown unit {u:?}")),
        };
        rest = &rest[unit_len..];
        // A huge number must be refused, not panic in `from_secs_f64` or in the addition.
        total = Duration::try_from_secs_f64(value * unit)
            .ok()
            .and_then(|d| total.checked_add(d))
            .filter(|d| *d <= MAX_DURATION)
            .ok_or_else(|| format!("too long (at most {}h)", MAX_DURATION.as_secs() / 3600))?;
    }
    Ok(total)
}

/// Linux's upper bounds for TCP_KEEPIDLE / TCP_KEEPINTVL (seconds) and TCP_KEEPCNT: larger values are refused
/// by the kernel, which ztunnel only logs; here they are a start-up error.
const MAX_KEEPALIVE_SECS: u64 = 32_767;
const MAX_KEEPALIVE_RETRIES: u32 = 127;

fn keepalive(src: &dyn Source) -> Result<Keepalive, Error> {
    let ka = Keepalive {
        enabled: parse_opt_bool(src, KEEPALIVE_ENABLED)?.unwrap_or(true),
        time: parse_duration(src, KEEPALIVE_TIME, Duration::from_secs(180))?,
        interval: parse_duration(src, KEEPALIVE_INTERVAL, Duration::from_secs(180))?,
        retries: parse_default(src, KEEPALIVE_RETRIES, 9)?,
        user_timeout: parse_opt_bool(src, USER_TIMEOUT_ENABLED)?.unwrap_or(false),
    };
    if !ka.enabled && !ka.user_timeout {
        return Ok(ka);
    }
    for (name, d) in [(KEEPALIVE_TIME, ka.time), (KEEPALIVE_INTERVAL, ka.interval)] {
        if d < Duration::from_secs(1) || d > Duration::from_secs(MAX_KEEPALIVE_SECS) {
            return Err(invalid(
                name,
                &format!("{d:?}"),
                format!("TCP keepalive times are whole seconds from 1s to {MAX_KEEPALIVE_SECS}s"),
            ));
        }
    }
    if !(1..=MAX_KEEPALIVE_RETRIES).contains(&ka.retries) {
        return Err(invalid(
            KEEPALIVE_RETRIES,
            &ka.retries.to_string(),
            format!("from 1 to {MAX_KEEPALIVE_RETRIES}"),
        ));
    }
    Ok(ka)
}

fn parse_size(src: &dyn Source, name: &'static str, default: u32) -> Result<u32, Error> {
    match src.get(name) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => size(&v).map_err(|reason| invalid(name, &v, reason)),
    }
}

/// Parses sizes as Kubernetes quantities are written: `4194304`, `4Mi`, `512Ki`.
fn size(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("Ki") {
        (n, 1u64 << 10)
    } else if let Some(n) = s.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("Gi") {
        (n, 1 << 30)
    } else {
        (s, 1)
    };
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a size such as 4194304 or 4Mi".to_string())?;
    n.checked_mul(mult)
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| format!("too large (at most {} bytes)", u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&'static str, &'static str)]) -> Result<Config, Error> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        Config::from_source(&map)
    }

    #[test]
    fn proxy_help_names_every_variable_the_proxy_reads_with_its_real_default() {
        crate::config::vars::testing::check(
            &[PROXY_VARS],
            PROXY_VARS,
            &[
                &[],
                &[
                    (PROXY_MODE, "dedicated"),
                    (PROXY_WORKLOAD_INFO, "default/client/sleep"),
                    (LOCAL_XDS_PATH, "/etc/local.yaml"),
                    (XDS_ADDRESS, ""),
                    (TERMINATION_GRACE_PERIOD_SECONDS, "30"),
                ],
                &[(LOCAL_XDS, "workloads: []"), (CA_ADDRESS, "ca:15012")],
                &[(XDS_ADDRESS, ""), (CA_CERTS_DIR, "/etc/cacerts")],
                &[(XDS_ADDRESS, "")],
            ],
            |src| format!("{:?}", Config::from_source(src)),
        );
    }

    #[test]
    fn dedicated_mode_reads_ztunnel_variables() {
        let c = cfg(&[
            (PROXY_MODE, "dedicated"),
            (PROXY_WORKLOAD_INFO, "default/client/sleep"),
            (LOCAL_XDS_PATH, "/etc/local.yaml"),
            (XDS_ADDRESS, ""),
            (PACKET_MARK, "4242"),
            (ENABLE_ORIG_SRC, "false"),
            (NODE_NAME, "node-1"),
            (SECRET_TTL, "1h30m"),
            (POOL_UNUSED_RELEASE_TIMEOUT, "10s"),
            (HTTP2_STREAM_WINDOW_SIZE, "1Mi"),
        ])
        .unwrap();
        assert_eq!(c.proxy_mode, ProxyMode::Dedicated);
        assert_eq!(c.workload_info.unwrap().service_account, "sleep");
        assert_eq!(
            c.local_config,
            LocalConfigSource::File("/etc/local.yaml".into())
        );
        assert_eq!(c.xds, None);
        assert_eq!(c.packet_mark, Some(4242));
        assert_eq!(c.enable_orig_src, Some(false));
        assert_eq!(c.node_name.as_deref(), Some("node-1"));
        assert_eq!(c.secret_ttl, Duration::from_secs(5400));
        assert_eq!(c.pool.unused_release_timeout, Duration::from_secs(10));
        assert_eq!(c.h2.stream_window, 1 << 20);
    }

    #[test]
    fn the_admin_port_is_15000_or_proxy_config_s_proxy_admin_port() {
        let base = [(PROXY_MODE, "dedicated"), (PROXY_WORKLOAD_INFO, "a/b/c")];
        assert_eq!(cfg(&base).unwrap().ports.admin, 15000);
        let with = |pc: &'static str| {
            let mut pairs = base.to_vec();
            pairs.push((PROXY_CONFIG, pc));
            cfg(&pairs)
        };
        assert_eq!(with("proxyAdminPort: 15999").unwrap().ports.admin, 15999);
        assert_eq!(
            with(r#"{"proxyAdminPort": 15099, "concurrency": 2}"#)
                .unwrap()
                .ports
                .admin,
            15099
        );
        assert_eq!(with("concurrency: 2").unwrap().ports.admin, 15000);
        let e = with("proxyAdminPort: lots").unwrap_err().to_string();
        assert!(e.contains(PROXY_CONFIG), "{e}");
    }

    #[test]
    fn defaults_match_ztunnel() {
        let c = cfg(&[(PROXY_MODE, "dedicated"), (PROXY_WORKLOAD_INFO, "a/b/c")]).unwrap();
        assert_eq!(c.packet_mark, Some(1337));
        assert_eq!(c.pool.max_streams_per_connection, 100);
        assert_eq!(c.secret_ttl, Duration::from_secs(86400));
        assert_eq!(c.ports.illegal(), [15001, 15006, 15008]);
        assert_eq!(c.enable_orig_src, None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[&[(&str, &str)]] = &[
            &[(PROXY_MODE, "sidecar")],
            &[(PROXY_MODE, "dedicated")],
            &[(PROXY_MODE, "dedicated"), (PROXY_WORKLOAD_INFO, "only/two")],
            &[
                (PROXY_MODE, "dedicated"),
                (PROXY_WORKLOAD_INFO, "a/b/c"),
                (PACKET_MARK, "x"),
            ],
            &[
                (PROXY_MODE, "dedicated"),
                (PROXY_WORKLOAD_INFO, "a/b/c"),
                (SECRET_TTL, "10"),
            ],
            &[
                (PROXY_MODE, "dedicated"),
                (PROXY_WORKLOAD_INFO, "a/b/c"),
                (ENABLE_ORIG_SRC, "maybe"),
            ],
            &[
                (PROXY_MODE, "dedicated"),
                (PROXY_WORKLOAD_INFO, "a/b/c"),
                (HTTP2_FRAME_SIZE, "10"),
            ],
        ];
        for case in cases {
            let map: HashMap<&str, &str> = case.iter().copied().collect();
            let err = Config::from_source(&map).unwrap_err().to_string();
            let var = case.last().unwrap().0;
            assert!(
                err.contains(var) || err.contains(PROXY_WORKLOAD_INFO),
                "error {err:?} does not name {var}"
            );
        }
    }

    #[test]
    fn control_plane_settings_follow_ztunnel() {
        let c = cfg(&[
            (PROXY_MODE, "shared"),
            (XDS_ADDRESS, "istiod.example:15012"),
            (XDS_ROOT_CA, "/etc/root.pem"),
            (CA_ROOT_CA, "SYSTEM"),
            (AUTH_TOKEN, "literal-token"),
            (ISTIO_META_CLUSTER_ID, "east"),
            (CLUSTER_ID, "ignored"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_METAJSON_LABELS", "{\"a\":\"b\"}"),
            ("XDS_HEADER_X_TENANT", "t1"),
            (POD_NAME, "ztunnel-abc"),
            (INSTANCE_IP, "10.0.0.9"),
        ])
        .unwrap();
        let xds = c.xds.unwrap();
        assert_eq!(xds.address, "https://istiod.example:15012");
        assert_eq!(xds.root, RootCa::File("/etc/root.pem".into()));
        assert_eq!(
            xds.headers,
            vec![("x-tenant".to_string(), "t1".to_string())]
        );
        // CA_ADDRESS unset while xDS is on: the CA is at the same address.
        let CaSource::Remote(ca) = c.ca else {
            panic!("expected a remote CA")
        };
        assert_eq!(ca.address, "https://istiod.example:15012");
        assert_eq!(ca.root, RootCa::System);
        assert_eq!(c.auth_token, AuthToken::Literal("literal-token".into()));
        assert_eq!(c.cluster_id, "east");
        assert_eq!(c.proxy_meta.metadata["DNS_CAPTURE"], "true");
        assert_eq!(c.proxy_meta.metadata["LABELS"]["a"], "b");
        assert_eq!(c.proxy_meta.pod_name, "ztunnel-abc");
        // Unset XDS_ADDRESS means istiod, as in ztunnel; empty means none, and then a local CA.
        let c = cfg(&[(PROXY_MODE, "shared")]).unwrap();
        assert_eq!(c.xds.unwrap().address, DEFAULT_ISTIOD);
        let c = cfg(&[(PROXY_MODE, "shared"), (XDS_ADDRESS, "")]).unwrap();
        assert!(c.xds.is_none());
        assert!(matches!(c.ca, CaSource::Builtin(_)));
        assert!(cfg(&[(PROXY_MODE, "shared"), ("ISTIO_METAJSON_X", "{")]).is_err());
    }

    /// `cfg` for a dedicated proxy with one more variable.
    fn with(name: &'static str, value: &str) -> Result<Config, Error> {
        let map: HashMap<&str, &str> = [
            (PROXY_MODE, "dedicated"),
            (PROXY_WORKLOAD_INFO, "a/b/c"),
            (name, value),
        ]
        .into_iter()
        .collect();
        Config::from_source(&map)
    }

    #[test]
    fn the_drain_deadline_follows_the_pods_grace_period_as_ztunnels_does() {
        let deadline = |pairs: &[(&'static str, &'static str)]| {
            cfg(pairs)
                .map(|c| c.termination_deadline)
                .map_err(|e| e.to_string())
        };
        assert_eq!(deadline(&[]), Ok(Duration::from_secs(5)));
        for (grace, want) in [
            ("30", 25),
            ("11", 6),
            ("10", 9),
            ("2", 1),
            ("1", 1),
            ("0", 1),
        ] {
            assert_eq!(
                deadline(&[(TERMINATION_GRACE_PERIOD_SECONDS, grace)]),
                Ok(Duration::from_secs(want)),
                "grace {grace}"
            );
        }
        // An explicit deadline wins.
        assert_eq!(
            deadline(&[
                (TERMINATION_GRACE_PERIOD_SECONDS, "30"),
                (CONNECTION_TERMINATION_DEADLINE, "2s")
            ]),
            Ok(Duration::from_secs(2))
        );
        let err = deadline(&[(TERMINATION_GRACE_PERIOD_SECONDS, "soon")]).unwrap_err();
        assert!(err.contains(TERMINATION_GRACE_PERIOD_SECONDS), "{err}");
    }

    #[test]
    fn huge_durations_and_sizes_are_config_errors_not_panics() {
        let huge = format!("1{}s", "0".repeat(400));
        for (name, value) in [
            (SECRET_TTL, "100000000000000000000s"),
            (SECRET_TTL, huge.as_str()),
            (SECRET_TTL, "18446744073709551615s18446744073709551615s"),
            (SECRET_TTL, "300000y"),
            (POOL_UNUSED_RELEASE_TIMEOUT, "9999999999999999h"),
            (CONNECTION_TERMINATION_DEADLINE, "1e300s"),
            (HTTP2_STREAM_WINDOW_SIZE, "18446744073709551615Gi"),
            (HTTP2_CONNECTION_WINDOW_SIZE, "99999999999999999999"),
            (HTTP2_FRAME_SIZE, "17179869184Gi"),
        ] {
            let err = std::panic::catch_unwind(|| with(name, value))
                .unwrap_or_else(|_| panic!("{name}={value} panicked"))
                .expect_err(value)
                .to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn http2_windows_and_frame_sizes_outside_rfc_9113_are_refused() {
        for (name, value) in [
            (HTTP2_STREAM_WINDOW_SIZE, "0"),
            (HTTP2_STREAM_WINDOW_SIZE, "2Gi"),
            (HTTP2_CONNECTION_WINDOW_SIZE, "0"),
            (HTTP2_CONNECTION_WINDOW_SIZE, "65534"),
            (HTTP2_CONNECTION_WINDOW_SIZE, "2147483648"),
            (HTTP2_FRAME_SIZE, "0"),
            (HTTP2_FRAME_SIZE, "16383"),
            (HTTP2_FRAME_SIZE, "16Mi"),
        ] {
            let err = with(name, value).expect_err(value).to_string();
            assert!(err.contains(name), "{err}");
        }
        // The edges themselves are fine.
        let c = with(HTTP2_CONNECTION_WINDOW_SIZE, "65535").unwrap();
        assert_eq!(c.h2.connection_window, 65_535);
        assert_eq!(
            with(HTTP2_STREAM_WINDOW_SIZE, "1")
                .unwrap()
                .h2
                .stream_window,
            1
        );
        assert_eq!(
            with(HTTP2_STREAM_WINDOW_SIZE, "2147483647")
                .unwrap()
                .h2
                .stream_window,
            (1 << 31) - 1
        );
        assert_eq!(
            with(HTTP2_FRAME_SIZE, "16777215").unwrap().h2.frame_size,
            16_777_215
        );
    }

    #[test]
    fn keepalive_reads_ztunnel_variables_and_defaults() {
        let d = cfg(&[(PROXY_MODE, "dedicated"), (PROXY_WORKLOAD_INFO, "a/b/c")]).unwrap();
        assert_eq!(
            d.keepalive,
            Keepalive {
                enabled: true,
                time: Duration::from_secs(180),
                interval: Duration::from_secs(180),
                retries: 9,
                user_timeout: false,
            }
        );
        assert_eq!(d.keepalive.user_timeout(), None);
        let c = cfg(&[
            (PROXY_MODE, "dedicated"),
            (PROXY_WORKLOAD_INFO, "a/b/c"),
            (KEEPALIVE_TIME, "30s"),
            (KEEPALIVE_INTERVAL, "5s"),
            (KEEPALIVE_RETRIES, "3"),
            (USER_TIMEOUT_ENABLED, "true"),
        ])
        .unwrap();
        assert_eq!(c.keepalive.time, Duration::from_secs(30));
        assert_eq!(c.keepalive.user_timeout(), Some(Duration::from_secs(45)));
        assert!(!with(KEEPALIVE_ENABLED, "false").unwrap().keepalive.enabled);
        for (name, value) in [
            (KEEPALIVE_TIME, "0s"),
            (KEEPALIVE_TIME, "500ms"),
            (KEEPALIVE_INTERVAL, "10h"),
            (KEEPALIVE_RETRIES, "0"),
            (KEEPALIVE_RETRIES, "128"),
            (KEEPALIVE_RETRIES, "-1"),
            (KEEPALIVE_ENABLED, "sometimes"),
        ] {
            let err = with(name, value).expect_err(value).to_string();
            assert!(err.contains(name), "{err}");
        }
        // Unused values are not checked against the kernel's ranges when keepalive is off.
        let off = cfg(&[
            (PROXY_MODE, "dedicated"),
            (PROXY_WORKLOAD_INFO, "a/b/c"),
            (KEEPALIVE_ENABLED, "false"),
            (KEEPALIVE_RETRIES, "0"),
        ]);
        assert!(off.is_ok());
    }

    #[test]
    fn process_limits_and_hbone_timeouts_are_configurable() {
        let d = cfg(&[(PROXY_MODE, "dedicated"), (PROXY_WORKLOAD_INFO, "a/b/c")]).unwrap();
        assert_eq!(d.max_connections_total, 65_536);
        assert_eq!(d.max_handshakes_per_source, 256);
        assert_eq!(d.handshake_timeout, Duration::from_secs(10));
        assert_eq!(d.hbone_idle_timeout, Duration::from_secs(600));
        let c = cfg(&[
            (PROXY_MODE, "dedicated"),
            (PROXY_WORKLOAD_INFO, "a/b/c"),
            (MESHNODE_MAX_CONNECTIONS_TOTAL, "10"),
            (MESHNODE_MAX_HANDSHAKES_PER_SOURCE, "2"),
            (MESHNODE_HANDSHAKE_TIMEOUT, "250ms"),
            (MESHNODE_HBONE_IDLE_TIMEOUT, "1m"),
        ])
        .unwrap();
        assert_eq!(c.max_connections_total, 10);
        assert_eq!(c.max_handshakes_per_source, 2);
        assert_eq!(c.handshake_timeout, Duration::from_millis(250));
        assert_eq!(c.hbone_idle_timeout, Duration::from_secs(60));
        // Clones share the process's counters.
        assert!(std::sync::Arc::ptr_eq(&c.admission, &c.clone().admission));
        for (name, value) in [
            (MESHNODE_MAX_CONNECTIONS_TOTAL, "0"),
            (MESHNODE_MAX_HANDSHAKES_PER_SOURCE, "0"),
            (MESHNODE_HANDSHAKE_TIMEOUT, "0s"),
            (MESHNODE_HBONE_IDLE_TIMEOUT, "0ms"),
        ] {
            let err = with(name, value).expect_err(value).to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(duration("5").is_err());
        assert!(duration("5d").is_err());
        assert!(duration("").is_err());
    }

    #[test]
    fn the_dns_proxy_follows_istios_metadata_and_refuses_a_bad_address() {
        let on = cfg(&[]).unwrap();
        assert!(on.dns.enabled);
        assert_eq!(on.dns.bind, DnsBind::Localhost(DEFAULT_DNS_PORT));
        assert_eq!(on.dns.cluster_domain, "cluster.local");
        let off = cfg(&[("ISTIO_META_DNS_CAPTURE", "False")]).unwrap();
        assert!(!off.dns.enabled);
        let moved = cfg(&[
            ("ISTIO_META_DNS_PROXY_ADDR", "127.0.0.1:5353"),
            ("CLUSTER_DOMAIN", "Corp.Example."),
        ])
        .unwrap();
        assert_eq!(
            moved.dns.bind,
            DnsBind::Addr("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(moved.dns.cluster_domain, "corp.example");
        for bad in ["localhost:dns", "somewhere:53", "127.0.0.1"] {
            let err = cfg(&[("ISTIO_META_DNS_PROXY_ADDR", bad)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("ISTIO_META_DNS_PROXY_ADDR"), "{bad}: {err}");
        }
    }
}
