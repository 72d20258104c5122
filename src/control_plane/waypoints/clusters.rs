//! `DestinationRule` → the waypoint's [`wp::Cluster`]s: a service port's endpoints (all, or a subset's by
//! labels) with the rule's load balancer, connection pool and outlier detection (a subset's own
//! `trafficPolicy` replaces the top-level one section by section, as istiod merges them). Which rule: the
//! one for the service's host in the waypoint's namespace, else in the service's, else in the root
//! namespace (istiod's lookup for the waypoint as client). Every rule is checked, used or not.

use super::routes::{host_service, ServiceKey};
use super::{duration, invalid, non_empty};
use crate::control_plane::config::{pod_uid, Error, Labels, MeshConfig, ServiceSpec};
use crate::control_plane::objects::networking::{DestinationRuleSpec, SimpleLb, TrafficPolicy};
use crate::control_plane::objects::Spec;
use crate::proto::waypoint as wp;

/// Envoy's outlier detection defaults, filled in so that the waypoint needs none: 5 consecutive 5xx
/// (Envoy enforces it whenever outlier detection is on, and istiod leaves it so unless set), gateway errors
/// off, a 10 s interval, 30 s base ejection, at most 10 % of endpoints ejected.
const OUTLIER_CONSECUTIVE_5XX: u32 = 5;
const OUTLIER_INTERVAL_SECS: i64 = 10;
const OUTLIER_BASE_EJECTION_SECS: i64 = 30;
const OUTLIER_MAX_EJECTION_PERCENT: u32 = 10;

/// One section-wise traffic policy.
#[derive(Debug, Clone, Default, PartialEq)]
struct Policy {
    load_balancer: Option<wp::LoadBalancer>,
    connection_pool: Option<wp::ConnectionPool>,
    outlier_detection: Option<wp::OutlierDetection>,
}

impl Policy {
    /// `self` with the sections `over` sets replaced.
    fn merged(&self, over: &Policy) -> Policy {
        Policy {
            load_balancer: over.load_balancer.or(self.load_balancer),
            connection_pool: over.connection_pool.or(self.connection_pool),
            outlier_detection: over.outlier_detection.or(self.outlier_detection),
        }
    }
}

#[derive(Debug)]
struct Rule {
    at: String,
    namespace: String,
    service: ServiceKey,
    policy: Policy,
    /// name, labels, policy (merged with the top-level one).
    subsets: Vec<(String, Labels, Policy)>,
}

/// The file's DestinationRules, checked.
#[derive(Debug, Default)]
pub(super) struct DestinationRules {
    rules: Vec<Rule>,
}

impl DestinationRules {
    pub(super) fn new(cfg: &MeshConfig) -> Result<DestinationRules, Error> {
        let mut rules: Vec<Rule> = Vec::new();
        for (i, obj) in cfg.istio.iter().enumerate() {
            let Spec::DestinationRule(spec) = &obj.spec else {
                continue;
            };
            let at = format!("istio[{i}].spec");
            let rule = destination_rule(cfg, &obj.metadata.namespace, spec, at)?;
            if let Some(other) = rules
                .iter()
                .find(|r| r.namespace == rule.namespace && r.service == rule.service)
            {
                return Err(invalid(
                    format!("{}.host", rule.at),
                    format!(
                        "{}/{} already has a DestinationRule in {} ({}); merge them",
                        rule.service.0, rule.service.1, rule.namespace, other.at
                    ),
                ));
            }
            rules.push(rule);
        }
        Ok(DestinationRules { rules })
    }

    /// Whether any DestinationRule for `svc` defines `subset`.
    pub(super) fn any_subset(&self, svc: &ServiceSpec, subset: &str) -> bool {
        self.rules.iter().any(|r| {
            r.service == (svc.namespace.clone(), svc.name.clone())
                && r.subsets.iter().any(|(n, _, _)| n == subset)
        })
    }

    /// The rule a waypoint of `waypoint_ns` uses for `svc`.
    fn applicable(&self, cfg: &MeshConfig, waypoint_ns: &str, svc: &ServiceSpec) -> Option<&Rule> {
        [
            waypoint_ns,
            svc.namespace.as_str(),
            cfg.root_namespace.as_str(),
        ]
        .into_iter()
        .find_map(|ns| {
            self.rules.iter().find(|r| {
                r.namespace == ns && r.service.0 == svc.namespace && r.service.1 == svc.name
            })
        })
    }

    /// The cluster `outbound|<port>|<subset>|<hostname>` as a waypoint of `waypoint_ns` sees it; an unknown
    /// subset is an error naming `field`.
    pub(super) fn cluster(
        &self,
        cfg: &MeshConfig,
        waypoint_ns: &str,
        svc: &ServiceSpec,
        port: u16,
        subset: &str,
        field: &str,
    ) -> Result<wp::Cluster, Error> {
        let rule = self.applicable(cfg, waypoint_ns, svc);
        let (labels, policy) = if subset.is_empty() {
            (None, rule.map(|r| r.policy.clone()).unwrap_or_default())
        } else {
            let found = rule.and_then(|r| r.subsets.iter().find(|(n, _, _)| n == subset));
            match found {
                Some((_, labels, policy)) => (Some(labels), policy.clone()),
                None => {
                    let which = rule.map_or_else(
                        || "no DestinationRule applies".to_string(),
                        |r| format!("the DestinationRule it uses ({}) has none", r.at),
                    );
                    return Err(invalid(
                        format!("{field}.subset"),
                        format!(
                            "subset {subset:?} of {}/{} at the waypoints of {waypoint_ns}: {which}",
                            svc.namespace, svc.name
                        ),
                    ));
                }
            }
        };
        let hostname = cfg.service_hostname(&svc.namespace, &svc.name);
        let mut endpoints: Vec<String> = cfg
            .workloads
            .iter()
            .filter(|w| {
                w.namespace == svc.namespace
                    && !svc.selector.is_empty()
                    && contains(&w.labels, &svc.selector)
                    && labels.is_none_or(|l| contains(&w.labels, l))
            })
            .map(|w| pod_uid(&cfg.cluster_id, &w.namespace, &w.name))
            .collect();
        endpoints.sort();
        Ok(wp::Cluster {
            name: cluster_name(port, subset, &hostname),
            service_hostname: hostname,
            port: u32::from(port),
            subset: subset.to_string(),
            endpoints,
            load_balancer: policy.load_balancer,
            connection_pool: policy.connection_pool,
            outlier_detection: policy.outlier_detection,
        })
    }
}

/// Envoy's (and istiod's) cluster name.
pub(super) fn cluster_name(port: u16, subset: &str, hostname: &str) -> String {
    format!("outbound|{port}|{subset}|{hostname}")
}

fn contains(labels: &Labels, wanted: &Labels) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn destination_rule(
    cfg: &MeshConfig,
    ns: &str,
    spec: &DestinationRuleSpec,
    at: String,
) -> Result<Rule, Error> {
    if let Some(f) = spec.unsupported() {
        return Err(invalid(format!("{at}.{f}"), "not supported"));
    }
    let host = &spec.host;
    non_empty(host, &format!("{at}.host"))?;
    if host.contains('*') {
        return Err(invalid(
            format!("{at}.host"),
            format!("{host:?}: wildcard hosts are not supported"),
        ));
    }
    let svc = host_service(cfg, host, ns).ok_or_else(|| {
        invalid(
            format!("{at}.host"),
            format!("{host:?} is not a service of the mesh file"),
        )
    })?;
    let policy = match &spec.traffic_policy {
        Some(p) => traffic_policy(p, &format!("{at}.trafficPolicy"))?,
        None => Policy::default(),
    };
    let mut subsets: Vec<(String, Labels, Policy)> = Vec::new();
    for (k, s) in spec.subsets.iter().enumerate() {
        let sat = format!("{at}.subsets[{k}]");
        non_empty(&s.name, &format!("{sat}.name"))?;
        if subsets.iter().any(|(n, _, _)| *n == s.name) {
            return Err(invalid(
                format!("{sat}.name"),
                format!("subset {:?} is defined twice", s.name),
            ));
        }
        let own = match &s.traffic_policy {
            Some(p) => traffic_policy(p, &format!("{sat}.trafficPolicy"))?,
            None => Policy::default(),
        };
        subsets.push((s.name.clone(), s.labels.clone(), policy.merged(&own)));
    }
    Ok(Rule {
        at,
        namespace: ns.to_string(),
        service: (svc.namespace.clone(), svc.name.clone()),
        policy,
        subsets,
    })
}

fn proto_duration(text: &str, at: &str) -> Result<prost_types::Duration, Error> {
    Ok(super::routes::proto_duration(duration(text, at)?))
}

fn traffic_policy(p: &TrafficPolicy, at: &str) -> Result<Policy, Error> {
    if let Some(f) = p.unsupported() {
        return Err(invalid(format!("{at}.{f}"), "not supported"));
    }
    let mut out = Policy::default();
    if let Some(lb) = &p.load_balancer {
        if let Some(f) = lb.unsupported() {
            return Err(invalid(format!("{at}.loadBalancer.{f}"), "not supported"));
        }
        use wp::load_balancer::Simple;
        out.load_balancer = lb.simple.map(|s| wp::LoadBalancer {
            simple: match s {
                SimpleLb::Unspecified | SimpleLb::RoundRobin => Simple::RoundRobin,
                SimpleLb::LeastConn | SimpleLb::LeastRequest => Simple::LeastRequest,
                SimpleLb::Random => Simple::Random,
                SimpleLb::Passthrough => Simple::Passthrough,
            } as i32,
        });
    }
    if let Some(pool) = &p.connection_pool {
        let mut cp = wp::ConnectionPool::default();
        if let Some(tcp) = &pool.tcp {
            let tat = format!("{at}.connectionPool.tcp");
            if let Some(f) = tcp.unsupported() {
                return Err(invalid(format!("{tat}.{f}"), "not supported"));
            }
            cp.max_connections = tcp.max_connections.unwrap_or(0);
            if let Some(t) = &tcp.connect_timeout {
                cp.connect_timeout = Some(proto_duration(t, &format!("{tat}.connectTimeout"))?);
            }
        }
        if let Some(http) = &pool.http {
            let hat = format!("{at}.connectionPool.http");
            if let Some(f) = http.unsupported() {
                return Err(invalid(format!("{hat}.{f}"), "not supported"));
            }
            cp.http1_max_pending_requests = http.http1_max_pending_requests.unwrap_or(0);
            cp.http2_max_requests = http.http2_max_requests.unwrap_or(0);
            cp.max_requests_per_connection = http.max_requests_per_connection.unwrap_or(0);
            cp.max_retries = http.max_retries.unwrap_or(0);
            if let Some(t) = &http.idle_timeout {
                cp.idle_timeout = Some(proto_duration(t, &format!("{hat}.idleTimeout"))?);
            }
        }
        out.connection_pool = Some(cp);
    }
    if let Some(o) = &p.outlier_detection {
        let oat = format!("{at}.outlierDetection");
        if let Some(f) = o.unsupported() {
            return Err(invalid(format!("{oat}.{f}"), "not supported"));
        }
        let max = o
            .max_ejection_percent
            .unwrap_or(OUTLIER_MAX_EJECTION_PERCENT);
        if max > 100 {
            return Err(invalid(
                format!("{oat}.maxEjectionPercent"),
                format!("{max} is not a percentage"),
            ));
        }
        let secs = |s: i64| prost_types::Duration {
            seconds: s,
            nanos: 0,
        };
        out.outlier_detection = Some(wp::OutlierDetection {
            consecutive_5xx_errors: o.consecutive_5xx_errors.unwrap_or(OUTLIER_CONSECUTIVE_5XX),
            consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
            interval: Some(match &o.interval {
                Some(t) => proto_duration(t, &format!("{oat}.interval"))?,
                None => secs(OUTLIER_INTERVAL_SECS),
            }),
            base_ejection_time: Some(match &o.base_ejection_time {
                Some(t) => proto_duration(t, &format!("{oat}.baseEjectionTime"))?,
                None => secs(OUTLIER_BASE_EJECTION_SECS),
            }),
            max_ejection_percent: max,
        });
    }
    Ok(out)
}
