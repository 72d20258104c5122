//! The DNS proxy each captured pod gets, as ztunnel serves it: UDP and TCP on the pod's loopback
//! (:15053), where the pod's capture rules send its port-53 traffic when DNS capture is on. Mesh names
//! (Kubernetes services, ServiceEntry hosts, wildcards) are answered from the state snapshot; anything
//! else is forwarded to the upstream resolvers.
//!
//! Input: [`Resolver`] (built once per process from [`DnsConfig`](crate::config::DnsConfig): the name
//! rules, the upstreams of `MESHNODE_DNS_RESOLV_CONF`, the state, the metrics) and, per pod, the workload
//! it is, its network namespace and its bound [`Sockets`]. Output: answers. [`names`] decides what a name
//! means; [`upstream`] forwards; [`server`] reads queries, bounds them (at most [`MAX_IN_FLIGHT`] queries
//! and [`MAX_TCP_CONNECTIONS`] TCP connections per pod; queries over [`MAX_QUERY_BYTES`] refused) and
//! writes answers. [`lookup`] resolves, on demand and cached, the hostnames of workloads that have no
//! address (ServiceEntry `resolution: DNS` endpoints) when a connection is routed to one.
//!
//! Answers the proxy gives itself are authoritative with a 30 s TTL, as ztunnel's. A query the proxy
//! cannot parse gets FORMERR; a query from a pod not (yet) in the state gets SERVFAIL; an upstream that
//! does not answer gives SERVFAIL. The proxy never answers for a name it does not know: that would hide
//! the name from the pod.

pub mod lookup;
pub mod names;
mod server;
pub mod upstream;

use std::sync::Arc;

pub use server::{serve, Sockets};

use crate::config::{Config, WorkloadInfo};
use crate::metrics::Metrics;
use crate::netns::InpodNetns;
use crate::state::StateHandle;

/// Queries being answered at once for one pod; more UDP queries are dropped (the client retries), more
/// TCP queries wait on their connection.
pub const MAX_IN_FLIGHT: usize = 256;
/// TCP connections open at once per pod; more wait in the kernel backlog.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Largest query accepted (a query carries one question: a name of at most 255 bytes plus EDNS).
pub const MAX_QUERY_BYTES: usize = 4096;
/// TTL of the answers the proxy gives itself (ztunnel's).
pub const TTL_SECONDS: u32 = 30;

/// What every pod's DNS proxy shares.
pub struct Resolver {
    names: names::Names,
    upstreams: upstream::Upstreams,
    state: StateHandle,
    metrics: Arc<Metrics>,
    mark: Option<u32>,
    lookups: lookup::Lookups,
}

impl Resolver {
    /// The addresses of `host` of `like`'s family, for a connection routed to a workload known only by
    /// hostname (cached for the answer's TTL).
    pub async fn resolve_host(
        &self,
        host: &str,
        like: std::net::IpAddr,
    ) -> Result<Vec<std::net::IpAddr>, lookup::Error> {
        let opts = crate::socket::SocketOpts {
            mark: self.mark,
            transparent: false,
            reuse_port: false,
        };
        self.lookups
            .resolve(&self.upstreams, opts, host, like)
            .await
    }

    /// A resolver from its parts (tests and the fuzz target): no mark, upstreams from resolv.conf `text`.
    #[doc(hidden)]
    pub fn from_parts(
        names: names::Names,
        resolv_conf_text: &str,
        state: StateHandle,
        metrics: Arc<Metrics>,
    ) -> Arc<Resolver> {
        Arc::new(Resolver {
            names,
            upstreams: upstream::Upstreams::parse(resolv_conf_text),
            state,
            metrics,
            mark: None,
            lookups: lookup::Lookups::default(),
        })
    }

    /// The process's resolver (also when the DNS proxy is off: routing resolves hostnames with it). Reads
    /// the upstreams' resolv.conf now.
    pub fn new(cfg: &Config, state: StateHandle, metrics: Arc<Metrics>) -> Arc<Resolver> {
        Arc::new(Resolver {
            names: names::Names::new(
                &cfg.dns.cluster_domain,
                cfg.dns.preferred_namespace.clone(),
                cfg.ipv6_enabled,
            ),
            upstreams: upstream::Upstreams::read(&cfg.dns.resolv_conf),
            state,
            metrics,
            mark: cfg.packet_mark,
            lookups: lookup::Lookups::default(),
        })
    }
}

/// One pod's DNS proxy: who asks, and where its upstream queries leave from.
pub struct PodDns {
    /// The shared resolver.
    pub resolver: Arc<Resolver>,
    /// The pod's workload (the client of every query on its sockets).
    pub workload: WorkloadInfo,
    /// The pod's network namespace (in-pod mode); `None`: the proxy's own.
    pub netns: Option<Arc<InpodNetns>>,
}
