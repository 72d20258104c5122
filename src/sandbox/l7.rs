//! What the sandbox's waypoints do, as `sandbox status` shows it: each waypoint with its pod and the
//! services bound to it, the HTTP routes and L7 policies each one applies, and the control plane's warnings
//! (a `use-waypoint` naming a missing waypoint, a policy bound to nothing).
//!
//! Input: the [`Model`]. Output: a [`View`] computed by the control plane's own translation of the model's
//! mesh file (`control_plane::istio` and `control_plane::waypoints`), so it shows what the waypoints are
//! sent, not a second reading of the YAML.

use super::model::Model;
use crate::control_plane::{istio, waypoints, MeshConfig};
use crate::proto::waypoint as wp;

/// One waypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointRow {
    /// `namespace/name` of its Gateway.
    pub gateway: String,
    /// `service`, `workload`, `all` or `none` (`istio.io/waypoint-for`).
    pub traffic: &'static str,
    /// Its pod (`namespace/name`), if the sandbox made one.
    pub pod: Option<String>,
    /// Services bound to it (`name.namespace`... shortened to the name when in its namespace).
    pub services: Vec<String>,
    /// Pods bound to it (workload waypoints).
    pub workloads: usize,
    /// Its policies: `name` (whole waypoint) or `service: name`.
    pub policies: Vec<String>,
}

/// One HTTP route at a waypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRow {
    /// `service:port`.
    pub service: String,
    /// The route's name (`namespace/object[.index]`).
    pub route: String,
    /// Where it sends requests (`reviews-v1 80%, reviews-v2 20%`, `redirect`, ...).
    pub to: String,
}

/// The L7 part of the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Every waypoint Gateway.
    pub waypoints: Vec<WaypointRow>,
    /// Every HTTP route at a waypoint.
    pub routes: Vec<RouteRow>,
    /// The control plane's warnings about bindings and policies.
    pub warnings: Vec<String>,
}

/// The waypoints, routes and warnings of `model` (an error names what the control plane refused).
pub fn view(model: &Model) -> Result<View, String> {
    let cfg = MeshConfig::parse(&model.mesh_yaml()).map_err(|e| e.to_string())?;
    let converted = istio::convert(&cfg).map_err(|e| e.to_string())?;
    let translated = waypoints::convert(&cfg, &converted).map_err(|e| e.to_string())?;
    let mut out = View {
        warnings: translated.warnings.clone(),
        ..View::default()
    };
    for (key, w) in &translated.resources {
        let pod = model
            .pods
            .iter()
            .find(|p| p.namespace == w.namespace && p.waypoint.as_deref() == Some(&w.name))
            .map(|p| p.key());
        let mut policies: Vec<String> = w.policies.iter().map(|p| p.name.clone()).collect();
        for s in &w.services {
            policies.extend(s.policies.iter().map(|p| format!("{}: {}", s.name, p.name)));
            for port in &s.ports {
                for r in &port.routes {
                    out.routes.push(RouteRow {
                        service: format!(
                            "{}:{}",
                            short(&s.namespace, &s.name, &w.namespace),
                            port.port
                        ),
                        route: r.name.clone(),
                        to: destination(s, r),
                    });
                }
            }
        }
        out.waypoints.push(WaypointRow {
            gateway: key.clone(),
            traffic: traffic(w.traffic_type()),
            pod,
            services: w
                .services
                .iter()
                .map(|s| short(&s.namespace, &s.name, &w.namespace))
                .collect(),
            workloads: w.workloads.len(),
            policies,
        });
    }
    Ok(out)
}

fn short(namespace: &str, name: &str, home: &str) -> String {
    if namespace == home {
        name.to_string()
    } else {
        format!("{name}.{namespace}")
    }
}

fn traffic(t: wp::TrafficType) -> &'static str {
    match t {
        wp::TrafficType::Service => "service",
        wp::TrafficType::Workload => "workload",
        wp::TrafficType::All => "all",
        wp::TrafficType::None => "none",
    }
}

/// Where a route sends requests, by the names of the services (and subsets) of its clusters.
fn destination(s: &wp::Service, r: &wp::Route) -> String {
    match &r.action {
        Some(wp::route::Action::Forward(f)) => {
            let total: u32 = f.backends.iter().map(|b| b.weight).sum();
            let names: Vec<String> = f
                .backends
                .iter()
                .map(|b| {
                    let name = s
                        .clusters
                        .iter()
                        .find(|c| c.name == b.cluster)
                        .map(|c| {
                            let host = c.service_hostname.split('.').next().unwrap_or_default();
                            if c.subset.is_empty() {
                                host.to_string()
                            } else {
                                format!("{host} subset {}", c.subset)
                            }
                        })
                        .unwrap_or_else(|| b.cluster.clone());
                    if f.backends.len() == 1 || total == 0 {
                        name
                    } else {
                        format!("{name} {}%", b.weight * 100 / total)
                    }
                })
                .collect();
            names.join(", ")
        }
        Some(wp::route::Action::Redirect(_)) => "redirect".into(),
        Some(wp::route::Action::DirectResponse(d)) => format!("direct response {}", d.status),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::apply::{change, Verb};

    #[test]
    fn a_waypoint_with_a_weighted_route_and_a_policy_is_shown_as_the_control_plane_sends_it() {
        let m = Model::bookinfo("mn", Default::default());
        let manifest = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080, weight: 80}, {name: reviews-v2, port: 9080, weight: 20}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  targetRefs: [{kind: Service, group: '', name: reviews}]
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/productpage]}}]}]
";
        let (m, _) = change(&m, manifest, "t.yaml", Verb::Apply).unwrap();
        let v = view(&m).unwrap();
        assert_eq!(v.waypoints.len(), 1);
        let w = &v.waypoints[0];
        assert_eq!(w.gateway, "default/waypoint");
        assert_eq!(w.traffic, "service");
        assert_eq!(w.pod.as_deref(), Some("default/waypoint-0"));
        assert!(w.services.contains(&"reviews".to_string()), "{w:?}");
        assert!(w.services.contains(&"productpage".to_string()), "{w:?}");
        assert_eq!(w.policies, ["reviews: reviews-viewer"]);
        assert_eq!(v.routes.len(), 1, "{:?}", v.routes);
        assert_eq!(v.routes[0].service, "reviews:9080");
        assert_eq!(v.routes[0].to, "reviews-v1 80%, reviews-v2 20%");
    }

    #[test]
    fn a_namespace_naming_a_waypoint_that_does_not_exist_is_a_warning() {
        let m = Model::bookinfo("mn", Default::default());
        let manifest = "apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: nowhere}
";
        let (m, _) = change(&m, manifest, "t.yaml", Verb::Apply).unwrap();
        let v = view(&m).unwrap();
        assert!(v.waypoints.is_empty());
        assert!(
            v.warnings.iter().any(|w| w.contains("nowhere")),
            "{:?}",
            v.warnings
        );
    }
}
