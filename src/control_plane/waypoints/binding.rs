//! Waypoint Gateways and who binds to them: the `Gateway` objects of class `istio-waypoint`, their
//! instances among the file's workloads, and istiod's `istio.io/use-waypoint` resolution for services and
//! workloads (see `waypoints.rs` for the rules). Gateways of class `istio-east-west` are `topology.rs`'s.

use std::collections::HashMap;

use super::{invalid, WAYPOINT_PORT};
use crate::control_plane::config::{Error, Labels, MeshConfig, WorkloadSpec};
use crate::control_plane::istio::WAYPOINT_CLASS;
pub use crate::control_plane::objects::gateway::GATEWAY_NAME;
use crate::control_plane::objects::gateway::{FromNamespaces, GatewaySpec};
use crate::control_plane::objects::{IstioObject, Spec};
use crate::control_plane::topology::EAST_WEST_CLASS;
use crate::proto::waypoint as wp;

/// The label that names a waypoint for a namespace, Service or pod.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The label that names the namespace of that waypoint (default: the object's own).
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// The Gateway label saying what may bind to it.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// The label (and value) Istio's gateway controller puts on a waypoint's Service and pods.
pub(super) const MANAGED: (&str, &str) = ("gateway.istio.io/managed", "istio.io-mesh-controller");
/// The label Istio's east-west gateways carry (never bound to a waypoint either).
const MANAGED_EAST_WEST: &str = "istio.io-eastwest-controller";

/// A waypoint Gateway of the file.
#[derive(Debug)]
pub(super) struct Gateway<'a> {
    /// Where it is in the file (`istio[3]`).
    pub at: String,
    pub namespace: &'a str,
    pub name: &'a str,
    pub traffic: wp::TrafficType,
    pub from: FromNamespaces,
    pub selector: Labels,
    /// Workloads of its namespace labelled with its name: while there is none it is not ready.
    pub instances: Vec<&'a WorkloadSpec>,
    /// [`XFCC_INCLUDE_CLIENT_IDENTITY`] is set true.
    pub xfcc: bool,
}

impl Gateway<'_> {
    pub(super) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn ready(&self) -> bool {
        !self.instances.is_empty()
    }

    /// Whether an object of `ns` may bind (the HBONE listener's `allowedRoutes.namespaces`).
    fn allows(&self, cfg: &MeshConfig, ns: &str) -> bool {
        match self.from {
            FromNamespaces::All => true,
            FromNamespaces::Same => ns == self.namespace,
            FromNamespaces::Selector => cfg.namespaces.get(ns).is_some_and(|n| {
                self.selector
                    .iter()
                    .all(|(k, v)| n.labels.get(k) == Some(v))
            }),
        }
    }
}

/// The waypoint Gateways, checked; errors name the field.
pub(super) fn gateways(cfg: &MeshConfig) -> Result<Vec<Gateway<'_>>, Error> {
    let mut out = Vec::new();
    for (i, obj) in cfg.istio.iter().enumerate() {
        let Spec::Gateway(spec) = &obj.spec else {
            continue;
        };
        if spec.gateway_class_name == EAST_WEST_CLASS {
            continue; // a network's east-west gateway (topology.rs)
        }
        let at = format!("istio[{i}]");
        out.push(gateway(cfg, obj, spec, at)?);
    }
    for (j, s) in cfg.services.iter().enumerate() {
        if let Some(g) = out
            .iter()
            .find(|g| g.namespace == s.namespace && g.name == s.name)
        {
            return Err(invalid(
                format!("services[{j}].name"),
                format!(
                    "{}/{} is the Service of the waypoint Gateway {}, which the control plane makes \
                     (as Istio's gateway controller does); remove it from services",
                    s.namespace, s.name, g.at
                ),
            ));
        }
    }
    Ok(out)
}

fn gateway<'a>(
    cfg: &'a MeshConfig,
    obj: &'a IstioObject,
    spec: &GatewaySpec,
    at: String,
) -> Result<Gateway<'a>, Error> {
    let (ns, name) = (&obj.metadata.namespace, &obj.metadata.name);
    if name == "none" {
        return Err(invalid(
            format!("{at}.metadata.name"),
            format!("\"none\" is reserved: {USE_WAYPOINT}: none opts out of waypoints"),
        ));
    }
    if spec.gateway_class_name != WAYPOINT_CLASS {
        return Err(invalid(
            format!("{at}.spec.gatewayClassName"),
            format!(
                "{:?}: only waypoints ({WAYPOINT_CLASS}) and east-west gateways ({EAST_WEST_CLASS}) are \
                 served; meshnode has no ingress gateway",
                spec.gateway_class_name
            ),
        ));
    }
    if spec.addresses.is_some() {
        return Err(invalid(format!("{at}.spec.addresses"), "not supported"));
    }
    if let Some(f) = spec.unsupported() {
        return Err(invalid(format!("{at}.spec.{f}"), "not supported"));
    }
    if spec.listeners.is_empty() {
        return Err(invalid(
            format!("{at}.spec.listeners"),
            format!(
                "a waypoint needs its listener {{name: mesh, port: {WAYPOINT_PORT}, protocol: HBONE}}"
            ),
        ));
    }
    let mut allowed = None;
    for (k, l) in spec.listeners.iter().enumerate() {
        let lat = format!("{at}.spec.listeners[{k}]");
        if l.protocol != "HBONE" || l.port != WAYPOINT_PORT {
            return Err(invalid(
                lat,
                format!(
                    "{} {}: a waypoint listens on HBONE port {WAYPOINT_PORT} only",
                    l.protocol, l.port
                ),
            ));
        }
        if l.hostname.is_some() || l.tls.is_some() {
            let f = if l.hostname.is_some() {
                "hostname"
            } else {
                "tls"
            };
            return Err(invalid(format!("{lat}.{f}"), "not supported"));
        }
        if l.allowed_routes.as_ref().is_some_and(|a| a.kinds.is_some()) {
            return Err(invalid(
                format!("{lat}.allowedRoutes.kinds"),
                "not supported",
            ));
        }
        let namespaces = l
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref());
        let from = namespaces.and_then(|n| n.from).unwrap_or_default();
        let selector = namespaces.and_then(|n| n.selector.clone());
        if let Some(sel) = &selector {
            if sel.match_expressions.is_some() {
                return Err(invalid(
                    format!("{lat}.allowedRoutes.namespaces.selector.matchExpressions"),
                    "not supported; use matchLabels",
                ));
            }
        }
        if from == FromNamespaces::Selector && selector.is_none() {
            return Err(invalid(
                format!("{lat}.allowedRoutes.namespaces.selector"),
                "from: Selector needs a selector",
            ));
        }
        allowed.get_or_insert((from, selector.map(|s| s.match_labels).unwrap_or_default()));
    }
    let (from, selector) = allowed.unwrap_or_default();
    let traffic = match obj.metadata.labels.get(WAYPOINT_FOR).map(String::as_str) {
        None | Some("service") => wp::TrafficType::Service,
        Some("workload") => wp::TrafficType::Workload,
        Some("all") => wp::TrafficType::All,
        Some("none") => wp::TrafficType::None,
        Some(other) => {
            return Err(invalid(
                format!("{at}.metadata.labels.{WAYPOINT_FOR}"),
                format!("{other:?} is not one of service, workload, all, none"),
            ))
        }
    };
    let instances = cfg
        .workloads
        .iter()
        .filter(|w| w.namespace == *ns && w.labels.get(GATEWAY_NAME) == Some(name))
        .collect();
    let xfcc = match obj.metadata.annotations.get(XFCC_INCLUDE_CLIENT_IDENTITY) {
        None => false,
        Some(v) => annotation_bool(v).ok_or_else(|| {
            invalid(
                format!("{at}.metadata.annotations.{XFCC_INCLUDE_CLIENT_IDENTITY}"),
                format!("{v:?} is not a boolean (true or false)"),
            )
        })?,
    };
    Ok(Gateway {
        at,
        namespace: ns,
        name,
        traffic,
        from,
        selector,
        instances,
        xfcc,
    })
}

/// What binds to a waypoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Service,
    Workload,
}

/// The waypoints by key, for resolving bindings.
pub(super) struct Resolver<'c, 'g> {
    pub cfg: &'c MeshConfig,
    pub gateways: &'g [Gateway<'c>],
    pub index: HashMap<(&'c str, &'c str), usize>,
}

impl<'c, 'g> Resolver<'c, 'g> {
    pub(super) fn new(cfg: &'c MeshConfig, gateways: &'g [Gateway<'c>]) -> Resolver<'c, 'g> {
        let index = gateways
            .iter()
            .enumerate()
            .map(|(i, g)| ((g.namespace, g.name), i))
            .collect();
        Resolver {
            cfg,
            gateways,
            index,
        }
    }

    /// Resolves `istio.io/use-waypoint` for `what` (an object of namespace `ns` with `labels`), as istiod's
    /// `fetchWaypointForTarget` and its Service / workload wrappers: the index of its waypoint, or none
    /// (with a warning when a binding was asked for and cannot be honoured).
    pub(super) fn resolve(
        &self,
        what: &str,
        ns: &str,
        labels: &Labels,
        target: Target,
        warnings: &mut Vec<String>,
    ) -> Option<usize> {
        let ns_labels = self.cfg.namespaces.get(ns).map(|n| &n.labels);
        let (from_labels, name, direct) = match (
            labels.get(USE_WAYPOINT),
            ns_labels.and_then(|l| l.get(USE_WAYPOINT)),
        ) {
            (Some(name), _) => (labels, name, true),
            (None, Some(name)) => (ns_labels?, name, false),
            (None, None) => return None,
        };
        if name == "none" {
            return None; // opted out (an object's `none` also overrides its namespace's waypoint)
        }
        let wp_ns = from_labels
            .get(USE_WAYPOINT_NAMESPACE)
            .map_or(ns, String::as_str);
        let level = if direct { "" } else { " (from its namespace)" };
        let Some(&i) = self.index.get(&(wp_ns, name.as_str())) else {
            warnings.push(format!(
                "{what}: {USE_WAYPOINT}: {name}{level} names {wp_ns}/{name}, which is not a waypoint \
                 Gateway of the mesh file; no waypoint"
            ));
            return None;
        };
        let g = &self.gateways[i];
        if !g.ready() {
            warnings.push(format!(
                "{what}: waypoint {} is not ready (no workload is its instance: label {GATEWAY_NAME}: \
                 {}); no waypoint",
                g.key(),
                g.name
            ));
            return None;
        }
        if !g.allows(self.cfg, ns) {
            warnings.push(format!(
                "{what}: waypoint {} does not allow namespace {ns} (its listener's allowedRoutes); no \
                 waypoint",
                g.key()
            ));
            return None;
        }
        let allowed = match target {
            Target::Service => matches!(g.traffic, wp::TrafficType::Service | wp::TrafficType::All),
            Target::Workload => {
                matches!(g.traffic, wp::TrafficType::Workload | wp::TrafficType::All)
            }
        };
        if !allowed {
            // As istiod: a workload that only inherits a service waypoint is not an error.
            if target == Target::Service || direct {
                warnings.push(format!(
                    "{what}: waypoint {} is for {} traffic ({WAYPOINT_FOR}), not {}; no waypoint",
                    g.key(),
                    traffic_name(g.traffic),
                    if target == Target::Service {
                        "service"
                    } else {
                        "workload"
                    }
                ));
            }
            return None;
        }
        Some(i)
    }
}

/// Whether a Service is itself a waypoint's or an east-west gateway's (those never get a waypoint).
pub(super) fn is_gateway_service(labels: &Labels) -> bool {
    labels
        .get(MANAGED.0)
        .is_some_and(|v| v == MANAGED.1 || v == MANAGED_EAST_WEST)
}

pub(super) fn traffic_name(t: wp::TrafficType) -> &'static str {
    match t {
        wp::TrafficType::Service => "service",
        wp::TrafficType::Workload => "workload",
        wp::TrafficType::All => "all",
        wp::TrafficType::None => "no",
    }
}

/// The Gateway annotation asking the waypoint to tell apps who called (`x-forwarded-client-cert`).
pub const XFCC_INCLUDE_CLIENT_IDENTITY: &str = "ambient.istio.io/xfcc-include-client-identity";

/// A boolean annotation as Go's `strconv.ParseBool` reads it (Istio's parser).
fn annotation_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}
