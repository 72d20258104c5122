//! Who may use the control plane: the `tokens` of the current mesh file, checked for the CA and for xDS.
//!
//! Input: the presented bearer token (hashed at once; only SHA-256 digests are compared, in constant time),
//! the current [`MeshConfig`] and the wall clock (for `expires`). Output: the matching [`TokenSpec`], or a
//! gRPC status that says why not:
//! - `Unauthenticated`: no token, an unknown one, or one past its `expires`;
//! - `PermissionDenied`: a known token asking for what it may not have.
//!
//! The CA ([`MeshTokens`], istiod's rules): without `ImpersonatedIdentity` metadata a caller gets only its own
//! identity (a workload token's identity, or a node proxy token's optional `namespace`/`serviceAccount`);
//! with it, only a node proxy token bound to a `node` may ask, and only for identities with a pod on that
//! node. xDS ([`xds_caller`], with the [`XdsAccess`] it grants): a node proxy token sees everything (the
//! state of the whole mesh is its to see); a workload token whose identity is a waypoint's — its namespace
//! and service account are those of a workload labelled `gateway.networking.k8s.io/gateway-name` with the
//! name of a waypoint Gateway of that namespace (istioctl's waypoints run as a service account named after
//! the Gateway) — gets the Address and Authorization resources a waypoint needs to reach and check
//! endpoints, and the Waypoint resources of its own namespace only; a workload token whose identity is an
//! east-west gateway's — its namespace and service account are those of a workload labelled
//! `gateway.networking.k8s.io/gateway-name` with the name of a Gateway of class `istio-east-west` of that
//! namespace — gets the Address and Authorization resources a node proxy gets (what the gateway routes
//! by), nothing else; other workload tokens get no stream.
//! A mesh file with no tokens at all serves everything to anyone, as before tokens existed. An open stream
//! lasts only as long as its token is in the file, unexpired and granted the same access
//! ([`stream_still_allowed`]).

use std::sync::Arc;

use tokio::sync::watch;
use tonic::Status;

use super::config::{MeshConfig, TokenSpec};
use super::{istio, topology, waypoints};
use crate::identity::ca_server::token::TokenDigest;
use crate::identity::{Authenticate, Identity};

/// The caller of an xDS stream (a request extension the xDS check adds for the ADS server): its token,
/// which the per-token stream quota counts, and what it may see.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamOwner {
    /// The token's digest.
    pub token: TokenDigest,
    /// What the stream may be sent.
    pub access: XdsAccess,
}

/// What an xDS stream may be sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum XdsAccess {
    /// Every resource of every type (node proxies; anyone when the file lists no tokens).
    Everything,
    /// A waypoint's identity: Address and Authorization resources, and the Waypoint resources of this
    /// namespace.
    Waypoint {
        /// The waypoint's namespace.
        namespace: String,
    },
    /// An east-west gateway's identity: Address and Authorization resources only.
    EastWestGateway,
}

/// The entry of `cfg.tokens` matching `presented`, if it has not expired at `now`.
pub fn find<'a>(
    cfg: &'a MeshConfig,
    presented: &str,
    now: time::OffsetDateTime,
) -> Result<&'a TokenSpec, Status> {
    let digest = TokenDigest::of(presented);
    // Every entry is compared, so the time taken does not depend on which one matches.
    let mut found = None;
    for t in &cfg.tokens {
        if t.digest.matches(&digest) {
            found = Some(t);
        }
    }
    let spec = found.ok_or_else(|| Status::unauthenticated("unknown bearer token"))?;
    match spec.expires {
        Some(at) if at <= now => Err(Status::unauthenticated(format!(
            "the bearer token expired at {}",
            at.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| at.to_string())
        ))),
        _ => Ok(spec),
    }
}

/// Authorizes CA requests against the tokens of the current mesh file.
pub struct MeshTokens {
    config: watch::Receiver<Arc<MeshConfig>>,
}

impl MeshTokens {
    /// Checks requests against whatever `config` holds at the time of each request.
    pub fn new(config: watch::Receiver<Arc<MeshConfig>>) -> MeshTokens {
        MeshTokens { config }
    }
}

impl std::fmt::Debug for MeshTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTokens").finish_non_exhaustive()
    }
}

impl Authenticate for MeshTokens {
    fn authorize(
        &self,
        token: Option<&str>,
        requested: &Identity,
        impersonating: bool,
    ) -> Result<(), Status> {
        let cfg = self.config.borrow().clone();
        authorize_ca(
            &cfg,
            token,
            requested,
            impersonating,
            time::OffsetDateTime::now_utc(),
        )
    }
}

/// The CA rule (see the module header) at time `now`.
pub fn authorize_ca(
    cfg: &MeshConfig,
    token: Option<&str>,
    requested: &Identity,
    impersonating: bool,
    now: time::OffsetDateTime,
) -> Result<(), Status> {
    let token = token.ok_or_else(|| Status::unauthenticated("no bearer token"))?;
    let spec = find(cfg, token, now)?;
    let own = spec.own_identity(&cfg.trust_domain);
    if own.as_ref() == Some(requested) {
        return Ok(());
    }
    if !spec.node_proxy {
        let own = own.map_or_else(|| "no identity".to_string(), |o| o.to_string());
        return Err(Status::permission_denied(format!(
            "a token for {own} may not request {requested}"
        )));
    }
    if !impersonating {
        return Err(Status::permission_denied(format!(
            "a node proxy token gets {requested} only on a workload's behalf, with ImpersonatedIdentity metadata"
        )));
    }
    if spec.node.is_empty() {
        return Err(Status::permission_denied(
            "this node proxy token names no node, so it may ask for no workload's identity \
             (give it `node:` in the mesh file)",
        ));
    }
    let on_node = requested.trust_domain() == cfg.trust_domain
        && cfg.workloads.iter().any(|w| {
            w.node == spec.node
                && w.namespace == requested.namespace()
                && w.service_account == requested.service_account()
        });
    if !on_node {
        return Err(Status::permission_denied(format!(
            "{requested} has no pod on node {}",
            spec.node
        )));
    }
    Ok(())
}

/// The xDS rule: who may open a stream, and what it may see. `Ok(None)` when the file lists no tokens
/// (xDS for anyone, everything).
pub fn xds_caller(
    cfg: &MeshConfig,
    token: Option<&str>,
    now: time::OffsetDateTime,
) -> Result<Option<StreamOwner>, Status> {
    if cfg.tokens.is_empty() {
        return Ok(None);
    }
    let token = token.ok_or_else(|| Status::unauthenticated("no bearer token"))?;
    let spec = find(cfg, token, now)?;
    Ok(Some(StreamOwner {
        token: spec.digest,
        access: xds_access(cfg, spec)?,
    }))
}

/// What `spec`'s holder may see over xDS (see the module header).
pub fn xds_access(cfg: &MeshConfig, spec: &TokenSpec) -> Result<XdsAccess, Status> {
    if spec.node_proxy {
        return Ok(XdsAccess::Everything);
    }
    if waypoints::is_waypoint_identity(cfg, &spec.namespace, &spec.service_account) {
        return Ok(XdsAccess::Waypoint {
            namespace: spec.namespace.clone(),
        });
    }
    if is_east_west_gateway_identity(cfg, &spec.namespace, &spec.service_account) {
        return Ok(XdsAccess::EastWestGateway);
    }
    Err(Status::permission_denied(format!(
        "xDS is served to node proxy tokens, to waypoints and to east-west gateways; this is a workload \
         token for {}/{}, which is the service account of no waypoint or east-west gateway instance (a \
         workload labelled {} with the name of a Gateway of class {} or {} of its namespace)",
        spec.namespace,
        spec.service_account,
        waypoints::GATEWAY_NAME,
        istio::WAYPOINT_CLASS,
        topology::EAST_WEST_CLASS
    )))
}

/// Whether `namespace`/`sa` is the identity of an east-west gateway's instance: a workload of that
/// namespace and service account labelled `gateway.networking.k8s.io/gateway-name` with the name of a
/// Gateway of class `istio-east-west` in the same namespace.
pub fn is_east_west_gateway_identity(cfg: &MeshConfig, namespace: &str, sa: &str) -> bool {
    let gateways = topology::east_west_gateways(cfg);
    cfg.workloads.iter().any(|w| {
        w.namespace == namespace
            && w.service_account == sa
            && w.labels
                .get(waypoints::GATEWAY_NAME)
                .is_some_and(|gw| gateways.contains(&(namespace, gw.as_str())))
    })
}

/// Whether the xDS stream opened by `owner` may go on: its token is still in the file, not expired at
/// `now`, and still granted the same access.
pub fn stream_still_allowed(
    cfg: &MeshConfig,
    owner: &StreamOwner,
    now: time::OffsetDateTime,
) -> Result<(), Status> {
    let mut found = None;
    for t in &cfg.tokens {
        if t.digest.matches(&owner.token) {
            found = Some(t);
        }
    }
    let Some(t) = found else {
        return Err(Status::unauthenticated(
            "the bearer token was removed from the mesh file",
        ));
    };
    if t.expires.is_some_and(|at| at <= now) {
        return Err(Status::unauthenticated("the bearer token expired"));
    }
    match xds_access(cfg, t) {
        Ok(access) if access == owner.access => Ok(()),
        Ok(_) => Err(Status::permission_denied(
            "the bearer token's xDS access changed; reconnect",
        )),
        Err(_) if owner.access == XdsAccess::Everything => Err(Status::permission_denied(
            "the bearer token is no longer a node proxy token",
        )),
        Err(_) if owner.access == XdsAccess::EastWestGateway => Err(Status::permission_denied(
            "the bearer token's identity no longer runs an east-west gateway",
        )),
        Err(_) => Err(Status::permission_denied(
            "the bearer token's identity no longer runs a waypoint",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two networks' east-west gateways in `istio-system` (instances running as `istio-eastwestgateway`),
    /// a waypoint in `default`, and tokens for each identity, for a node and for a plain workload.
    const MESH: &str = "namespaces: {default: {labels: {istio.io/dataplane-mode: ambient}}, istio-system: {}}
workloads:
- {name: ew1-0, namespace: istio-system, serviceAccount: istio-eastwestgateway, ips: [10.1.0.9], node: n1,
   labels: {gateway.networking.k8s.io/gateway-name: ew1, istio.io/dataplane-mode: none, topology.istio.io/network: net1}}
- {name: ew2-0, namespace: istio-system, serviceAccount: istio-eastwestgateway, ips: [10.2.0.9], node: n2,
   labels: {gateway.networking.k8s.io/gateway-name: ew2, istio.io/dataplane-mode: none, topology.istio.io/network: net2}}
- {name: impostor, namespace: istio-system, serviceAccount: lookalike, ips: [10.1.0.8], node: n1,
   labels: {gateway.networking.k8s.io/gateway-name: not-a-gateway, topology.istio.io/network: net1}}
- {name: waypoint-0, namespace: default, serviceAccount: waypoint, ips: [10.1.0.7], node: n1,
   labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none, topology.istio.io/network: net1}}
- {name: web, namespace: default, serviceAccount: web, ips: [10.2.0.5], node: n2,
   labels: {app: web, topology.istio.io/network: net2}}
tokens:
- {token: node, nodeProxy: true, node: n1}
- {token: ew1, namespace: istio-system, serviceAccount: istio-eastwestgateway}
- {token: ew2, namespace: istio-system, serviceAccount: istio-eastwestgateway}
- {token: lookalike, namespace: istio-system, serviceAccount: lookalike}
- {token: waypoint, namespace: default, serviceAccount: waypoint}
- {token: web, namespace: default, serviceAccount: web}
istio:
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {name: ew1, namespace: istio-system, labels: {topology.istio.io/network: net1}}
  spec:
    gatewayClassName: istio-east-west
    listeners: [{name: mesh, port: 15008, protocol: HBONE, tls: {mode: Terminate}}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {name: ew2, namespace: istio-system, labels: {topology.istio.io/network: net2}}
  spec:
    gatewayClassName: istio-east-west
    listeners: [{name: mesh, port: 15008, protocol: HBONE, tls: {mode: Terminate}}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {name: waypoint, namespace: default}
  spec:
    gatewayClassName: istio-waypoint
    listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";

    fn now() -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc()
    }

    fn access(cfg: &MeshConfig, token: &str) -> Result<XdsAccess, Status> {
        xds_caller(cfg, Some(token), now()).map(|o| o.expect("the file has tokens").access)
    }

    #[test]
    fn an_east_west_gateways_identity_gets_an_xds_stream_of_addresses_and_policies_only() {
        let cfg = MeshConfig::parse(MESH).unwrap();
        // Each network's gateway has a token of its own, for the same identity.
        assert_eq!(access(&cfg, "ew1").unwrap(), XdsAccess::EastWestGateway);
        assert_eq!(access(&cfg, "ew2").unwrap(), XdsAccess::EastWestGateway);
        assert!(is_east_west_gateway_identity(
            &cfg,
            "istio-system",
            "istio-eastwestgateway"
        ));
        // What the others get is unchanged.
        assert_eq!(access(&cfg, "node").unwrap(), XdsAccess::Everything);
        assert_eq!(
            access(&cfg, "waypoint").unwrap(),
            XdsAccess::Waypoint {
                namespace: "default".into()
            }
        );
        // Its certificate: its own identity, nothing else.
        let own = Identity::new("cluster.local", "istio-system", "istio-eastwestgateway").unwrap();
        let web = Identity::new("cluster.local", "default", "web").unwrap();
        assert!(authorize_ca(&cfg, Some("ew1"), &own, false, now()).is_ok());
        let e = authorize_ca(&cfg, Some("ew1"), &web, false, now()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_workload_that_is_no_east_west_gateways_instance_gets_no_stream() {
        let cfg = MeshConfig::parse(MESH).unwrap();
        // A plain workload, and one labelled with the name of a Gateway that does not exist.
        for token in ["web", "lookalike"] {
            let e = access(&cfg, token).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{token}: {e}");
            assert!(e.message().contains("east-west gateway"), "{e}");
        }
        // The same identity in another namespace is not the gateway's.
        assert!(!is_east_west_gateway_identity(
            &cfg,
            "default",
            "istio-eastwestgateway"
        ));
        // A waypoint Gateway's instance is not an east-west gateway's.
        assert!(!is_east_west_gateway_identity(&cfg, "default", "waypoint"));
    }

    #[test]
    fn a_gateways_stream_ends_when_its_gateway_is_gone() {
        let cfg = MeshConfig::parse(MESH).unwrap();
        let owner = xds_caller(&cfg, Some("ew2"), now()).unwrap().unwrap();
        assert!(stream_still_allowed(&cfg, &owner, now()).is_ok());
        // Both east-west Gateways deleted: their instances' identity is an ordinary workload's now.
        let without: String = MESH
            .split("- apiVersion")
            .enumerate()
            .filter(|(i, part)| *i == 0 || part.contains("istio-waypoint"))
            .map(|(i, part)| {
                if i == 0 {
                    part.to_string()
                } else {
                    format!("- apiVersion{part}")
                }
            })
            .collect();
        let gone = MeshConfig::parse(&without).unwrap();
        let e = stream_still_allowed(&gone, &owner, now()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("east-west gateway"), "{e}");
    }
}
