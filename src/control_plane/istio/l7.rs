//! AuthorizationPolicies bound by `targetRef(s)` → meshnode's waypoint form
//! (`meshnode.waypoint.AuthorizationPolicy`), with the targets they name. `waypoints.rs` attaches them: a
//! Gateway target to that waypoint's `policies`, a Service target to the Service's `policies` on the
//! waypoint it is bound to, the `istio-waypoint` GatewayClass (root namespace only) to every waypoint.
//!
//! The waypoint sees HTTP, so the L7 fields are kept: `to.operation` `hosts`, `methods`, `paths`, `ports`
//! and their `not` forms; `when` on `request.headers[<name>]` and the L4 keys (`source.ip`,
//! `source.namespace`, `source.principal`, `destination.ip`, `destination.port`); `from.source`
//! `principals`, `namespaces`, `ipBlocks`, `remoteIpBlocks` and their `not` forms. `serviceAccounts:
//! [ns/sa]` becomes the principal `<trustDomain>/ns/<ns>/sa/<sa>` (the same identities). Values keep
//! Istio's string forms, validated as for node proxies. Refused, naming the field: CUSTOM and AUDIT (a
//! waypoint enforces ALLOW and DENY only), `requestPrincipals` and `request.auth.*` (no JWT
//! authentication), other `when` keys, targets of another namespace or of a kind a waypoint policy cannot
//! have.

use super::{
    cidrs, invalid, non_empty_strings, ports, principals, service_accounts, strings, Condition,
    IstioObject, OperationSpec, PolicyAction, RuleSpec, SourceSpec,
};
use crate::control_plane::config::{check_name, Error, MeshConfig};
use crate::control_plane::objects::security::AuthorizationPolicySpec;
use crate::proto::waypoint as wp;

/// The `when` keys a waypoint policy may use besides `request.headers[<name>]`.
const WAYPOINT_WHEN_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];
/// The Gateway API group of Gateway and GatewayClass targets.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// An AuthorizationPolicy for waypoints, with what it targets.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetedPolicy {
    /// Where it is in the file (`istio[3]`).
    pub at: String,
    /// The policy, as the waypoint enforces it.
    pub policy: wp::AuthorizationPolicy,
    /// Its targets, each with the field that names it (`istio[3].spec.targetRefs[1]`).
    pub targets: Vec<(String, PolicyTarget)>,
}

/// What a waypoint policy is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyTarget {
    /// The waypoint Gateway of this name in the policy's namespace.
    Gateway(String),
    /// The Service of this name in the policy's namespace (bound to a waypoint).
    Service(String),
    /// Every waypoint (GatewayClass `istio-waypoint`, from the root namespace).
    EveryWaypoint,
}

pub(super) fn targeted(
    cfg: &MeshConfig,
    obj: &IstioObject,
    spec: &AuthorizationPolicySpec,
    action: PolicyAction,
    dry_run: bool,
    at: &str,
) -> Result<TargetedPolicy, Error> {
    let ns = &obj.metadata.namespace;
    let action = match action {
        PolicyAction::Allow => wp::Action::Allow,
        PolicyAction::Deny => wp::Action::Deny,
        PolicyAction::Audit | PolicyAction::Custom => {
            return Err(invalid(
                format!("{at}.spec.action"),
                format!("a waypoint enforces ALLOW and DENY only, not {action:?}"),
            ))
        }
    };
    let refs = spec
        .target_ref
        .iter()
        .map(|t| (format!("{at}.spec.targetRef"), t))
        .chain(
            spec.target_refs
                .iter()
                .flatten()
                .enumerate()
                .map(|(k, t)| (format!("{at}.spec.targetRefs[{k}]"), t)),
        );
    let mut targets = Vec::new();
    for (field, t) in refs {
        if !t.namespace.is_empty() && t.namespace != *ns {
            return Err(invalid(
                format!("{field}.namespace"),
                format!("a policy in {ns} may only target objects of {ns}"),
            ));
        }
        check_name(&t.name).map_err(|r| invalid(format!("{field}.name"), r))?;
        let target = match (t.group.as_str(), t.kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => PolicyTarget::Gateway(t.name.clone()),
            ("" | "core", "Service") => PolicyTarget::Service(t.name.clone()),
            (GATEWAY_GROUP, "GatewayClass")
                if t.name == WAYPOINT_CLASS && *ns == cfg.root_namespace =>
            {
                PolicyTarget::EveryWaypoint
            }
            (GATEWAY_GROUP, "GatewayClass") => {
                return Err(invalid(
                    field,
                    format!(
                        "a GatewayClass target must be {WAYPOINT_CLASS} from the root namespace {}",
                        cfg.root_namespace
                    ),
                ))
            }
            (group, kind) => {
                return Err(invalid(
                    field,
                    format!(
                        "{kind} (group {group:?}) is not a waypoint policy target; targets are a \
                         Gateway or GatewayClass ({GATEWAY_GROUP}) or a Service (group \"\")"
                    ),
                ))
            }
        };
        targets.push((field, target));
    }
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        rules.push(waypoint_rule(
            rule,
            ns,
            &cfg.trust_domain,
            &format!("{at}.spec.rules[{r}]"),
        )?);
    }
    Ok(TargetedPolicy {
        at: at.to_string(),
        policy: wp::AuthorizationPolicy {
            name: obj.metadata.name.clone(),
            namespace: ns.clone(),
            action: action as i32,
            rules,
            dry_run,
        },
        targets,
    })
}

fn waypoint_rule(rule: &RuleSpec, ns: &str, td: &str, at: &str) -> Result<wp::Rule, Error> {
    let mut out = wp::Rule::default();
    for (k, entry) in rule.from.iter().enumerate() {
        let at = format!("{at}.from[{k}].source");
        let src = entry
            .source
            .as_ref()
            .ok_or_else(|| invalid(&at, "required"))?;
        out.from.push(source(src, ns, td, &at)?);
    }
    for (k, entry) in rule.to.iter().enumerate() {
        let at = format!("{at}.to[{k}].operation");
        let op = entry
            .operation
            .as_ref()
            .ok_or_else(|| invalid(&at, "required"))?;
        out.to.push(operation(op, &at)?);
    }
    for (k, cond) in rule.when.iter().enumerate() {
        out.when.push(condition(cond, &format!("{at}.when[{k}]"))?);
    }
    Ok(out)
}

fn source(src: &SourceSpec, ns: &str, td: &str, at: &str) -> Result<wp::Source, Error> {
    for (field, values) in [
        ("requestPrincipals", &src.request_principals),
        ("notRequestPrincipals", &src.not_request_principals),
    ] {
        if !values.is_empty() {
            return Err(invalid(
                format!("{at}.{field}"),
                "JWT request principals are not supported (meshnode has no RequestAuthentication)",
            ));
        }
    }
    let f = |field: &str| format!("{at}.{field}");
    principals(&src.principals, &f("principals"))?;
    principals(&src.not_principals, &f("notPrincipals"))?;
    strings(&src.namespaces, &f("namespaces"))?;
    strings(&src.not_namespaces, &f("notNamespaces"))?;
    cidrs(&src.ip_blocks, &f("ipBlocks"))?;
    cidrs(&src.not_ip_blocks, &f("notIpBlocks"))?;
    cidrs(&src.remote_ip_blocks, &f("remoteIpBlocks"))?;
    cidrs(&src.not_remote_ip_blocks, &f("notRemoteIpBlocks"))?;
    let spiffe = |accounts: Vec<crate::authz::ServiceAccountMatch>| {
        accounts
            .into_iter()
            .map(|a| format!("{td}/ns/{}/sa/{}", a.namespace, a.service_account))
    };
    let mut out = wp::Source {
        principals: src.principals.clone(),
        not_principals: src.not_principals.clone(),
        namespaces: src.namespaces.clone(),
        not_namespaces: src.not_namespaces.clone(),
        ip_blocks: src.ip_blocks.clone(),
        not_ip_blocks: src.not_ip_blocks.clone(),
        remote_ip_blocks: src.remote_ip_blocks.clone(),
        not_remote_ip_blocks: src.not_remote_ip_blocks.clone(),
    };
    out.principals.extend(spiffe(service_accounts(
        &src.service_accounts,
        ns,
        &f("serviceAccounts"),
    )?));
    out.not_principals.extend(spiffe(service_accounts(
        &src.not_service_accounts,
        ns,
        &f("notServiceAccounts"),
    )?));
    if out == wp::Source::default() {
        return Err(invalid(
            at,
            "an empty source matches nothing; give at least one field",
        ));
    }
    Ok(out)
}

fn operation(op: &OperationSpec, at: &str) -> Result<wp::Operation, Error> {
    let f = |field: &str| format!("{at}.{field}");
    for (field, values) in [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ] {
        strings(values, &f(field))?;
    }
    let text = |v: &[super::Scalar]| v.iter().map(super::Scalar::text).collect::<Vec<_>>();
    ports(&op.ports, &f("ports"))?;
    ports(&op.not_ports, &f("notPorts"))?;
    let out = wp::Operation {
        hosts: op.hosts.clone(),
        not_hosts: op.not_hosts.clone(),
        ports: text(&op.ports),
        not_ports: text(&op.not_ports),
        methods: op.methods.clone(),
        not_methods: op.not_methods.clone(),
        paths: op.paths.clone(),
        not_paths: op.not_paths.clone(),
    };
    if out == wp::Operation::default() {
        return Err(invalid(
            at,
            "an empty operation matches nothing; give at least one field",
        ));
    }
    Ok(out)
}

fn condition(cond: &Condition, at: &str) -> Result<wp::Condition, Error> {
    let key = cond.key.as_str();
    if cond.values.is_empty() && cond.not_values.is_empty() {
        return Err(invalid(at, "a condition needs values or notValues"));
    }
    let text = |v: &[super::Scalar]| v.iter().map(super::Scalar::text).collect::<Vec<_>>();
    let (values, not_values) = (text(&cond.values), text(&cond.not_values));
    let (vf, nf) = (format!("{at}.values"), format!("{at}.notValues"));
    match key {
        "source.ip" | "destination.ip" => {
            cidrs(&values, &vf)?;
            cidrs(&not_values, &nf)?;
        }
        "destination.port" => {
            ports(&cond.values, &vf)?;
            ports(&cond.not_values, &nf)?;
        }
        "source.namespace" => {
            strings(&values, &vf)?;
            strings(&not_values, &nf)?;
        }
        "source.principal" => {
            principals(&values, &vf)?;
            principals(&not_values, &nf)?;
        }
        _ => {
            let header = key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'));
            match header {
                Some(name) if !name.is_empty() && !name.contains(['[', ']']) => {
                    non_empty_strings(&values, &vf)?;
                    non_empty_strings(&not_values, &nf)?;
                }
                _ => {
                    return Err(invalid(
                        format!("{at}.key"),
                        format!(
                        "{key:?} is not supported at a waypoint (keys: request.headers[<name>], \
                             {WAYPOINT_WHEN_KEYS:?})"
                    ),
                    ))
                }
            }
        }
    }
    Ok(wp::Condition {
        key: key.to_string(),
        values,
        not_values,
    })
}
