//! Istio's security resources in the mesh file (`istio:`), translated the way istiod translates them for
//! ztunnel: `AuthorizationPolicy` and `PeerAuthentication` become L4 [`Policy`]s (`istio.security.Authorization`)
//! plus, per pod, the policy keys listed in `Workload.authorization_policies`. AuthorizationPolicies bound
//! by `targetRef(s)` are for waypoints only: `istio/l7.rs` converts them ([`TargetedPolicy`]) and
//! `waypoints.rs` attaches them. Every object of the list (whatever its kind) has its `apiVersion`, name,
//! namespace and uniqueness checked here.
//!
//! Input: the validated rest of a [`MeshConfig`] and its `istio:` list, objects as users write them:
//!
//! ```yaml
//! rootNamespace: istio-system          # optional (istiod's default)
//! istio:
//! - apiVersion: security.istio.io/v1   # or v1beta1
//!   kind: PeerAuthentication
//!   metadata: {name: default, namespace: bookinfo}
//!   spec: {mtls: {mode: STRICT}}
//! - apiVersion: security.istio.io/v1
//!   kind: AuthorizationPolicy
//!   metadata: {name: pp, namespace: bookinfo, annotations: {istio.io/dry-run: "false"}}
//!   spec:
//!     selector: {matchLabels: {app: productpage}}
//!     action: ALLOW
//!     rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}], to: [{operation: {ports: ["9080"]}}]}]
//! ```
//!
//! Output: [`Converted`] (the policies, warnings to log, and [`Converted::keys_for`] per pod), or a
//! [`config::Error::Invalid`](super::config::Error) naming the field (`istio[2].spec.rules[0].from[0].source.ipBlocks[1]`).
//!
//! Mirrored from istiod (`pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`, `policies.go`,
//! `workloads.go`; `pilot/pkg/model/authentication.go`):
//! - AuthorizationPolicy: scope `WORKLOAD_SELECTOR` with a selector, else `GLOBAL` in the root namespace, else
//!   `NAMESPACE`; name and namespace kept (key `ns/name`). Each Istio rule is one rule whose clauses are: the
//!   `to` entries (one match each: `ports`/`notPorts`), the `from` entries (`ipBlocks`, `namespaces`,
//!   `principals`, `serviceAccounts` and their `not` forms), then one clause per `when` condition (L4 keys
//!   `source.ip|namespace|principal`, `destination.ip|port`). Strings: `*` presence, `*x` suffix, `x*` prefix,
//!   else exact. `serviceAccounts: [sa]` means the policy's namespace. A pod lists the sorted keys of the
//!   selector policies of its namespace and of the root namespace whose labels it carries.
//! - L7 attributes (`hosts`, `methods`, `paths`, `requestPrincipals`, `remoteIpBlocks`, their `not` forms and
//!   non-L4 `when` keys, including `connection.sni`): an ALLOW rule using one is dropped; in a DENY rule they are
//!   removed; both are logged. AUDIT and CUSTOM policies are not sent, with a warning. Policies with
//!   `targetRef(s)` are not sent to node proxies (istiod drops them from its ztunnel resources).
//! - PeerAuthentication: whenever any exists, the DENY policy `<root>/istio_converted_static_strict`
//!   (`not_principals: [presence]`, `WORKLOAD_SELECTOR`) is sent, and a pod whose effective mode is STRICT lists
//!   it. Effective mode: mesh-wide (root namespace, no selector), overridden by namespace-wide, overridden by the
//!   pod's selector policy; UNSET inherits. A selector policy with `portLevelMtls` that changes some port
//!   becomes the DENY policy `<ns>/converted_peer_authentication_<name>`: under a STRICT mode one rule
//!   `[not_principals presence] AND [not_destination_ports p]...` (exceptions), under a non-strict mode one
//!   rule per STRICT port `not_principals presence, destination_ports [p]`; the pod then lists it instead of
//!   the static policy. Among several policies at one level istiod takes the oldest; here, the first in the file.
//!
//! Deliberate differences (each would otherwise widen access silently, or hide a mistake):
//! - refused instead of skipped: malformed CIDRs and ports, empty strings, `*` inside a value, `spiffe://`
//!   principals, empty `source`/`operation`, `when` without values or with an unknown key, unknown actions or
//!   modes, an empty `selector`, `portLevelMtls` without a selector (Istio's validation webhook refuses it too);
//! - a DENY `from`/`to` entry or `when` made only of L7 attributes drops its whole clause (the clause matches
//!   anything, so the rule denies more). istiod sends an empty match, which ztunnel never matches, so such a
//!   DENY rule would deny nothing;
//! - the `istio.io/dry-run` annotation sets `dry_run` (istiod's ambient translation ignores it);
//! - a DISABLE port under an inherited STRICT mode is an exception like PERMISSIVE (istiod's converter treats
//!   it so, but its key selection then still lists the static STRICT policy).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use self::peer::{peer_authentication, static_strict};
use super::config::{check_name, Error, Labels, MeshConfig};
use super::objects::security::{
    AuthorizationPolicySpec, Condition, MtlsMode, OperationSpec, PolicyAction, RuleSpec, SourceSpec,
};
use super::objects::{ObjectKind, Scalar, Spec};
use crate::authz::{Action, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch};

pub use self::l7::{PolicyTarget, TargetedPolicy, WAYPOINT_CLASS};
pub use super::config::DEFAULT_ROOT_NAMESPACE;
/// The security kinds (`sandbox apply` decides with it which documents are Istio objects).
pub use super::objects::IstioObject;
/// Name of istiod's static STRICT policy (`_` keeps it apart from Kubernetes names).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// Prefix istiod gives converted PeerAuthentications.
pub const CONVERTED_PEER_AUTHENTICATION_PREFIX: &str = "converted_peer_authentication_";
/// Annotation that makes an AuthorizationPolicy dry-run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// `when` keys istiod keeps for ztunnel.
const L4_WHEN_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];
/// Other `when` keys Istio knows (`request.headers[..]`, `request.auth.claims[..]` and
/// `experimental.envoy.filters.*` are matched by prefix).
const L7_WHEN_KEYS: [&str; 6] = [
    "remote.ip",
    "connection.sni",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "source.serviceAccount",
];
const L7_WHEN_PREFIXES: [&str; 3] = [
    "request.headers[",
    "request.auth.claims[",
    "experimental.envoy.filters.",
];

mod l7;
mod peer;

/// The translated Istio objects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Converted {
    /// Policies to send, istiod's names.
    pub policies: Vec<Policy>,
    /// What was dropped, widened or skipped, to log.
    pub warnings: Vec<String>,
    /// AuthorizationPolicies bound by `targetRef(s)`, in the waypoint's form, for `waypoints.rs` to attach.
    pub targeted: Vec<TargetedPolicy>,
    root: String,
    selector_policies: Vec<SelectorPolicy>,
    peers: Vec<PeerInfo>,
}

#[derive(Debug, Clone, PartialEq)]
struct SelectorPolicy {
    key: String,
    namespace: String,
    labels: Labels,
}

#[derive(Debug, Clone, PartialEq)]
struct PeerInfo {
    name: String,
    namespace: String,
    selector: Option<Labels>,
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
    /// Key of the converted policy, when one is sent.
    converted: Option<String>,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Translates and validates `cfg.istio`: the security objects here; every object's `apiVersion`, name,
/// namespace and uniqueness (per kind) too, so that `waypoints.rs` can take them as checked.
pub fn convert(cfg: &MeshConfig) -> Result<Converted, Error> {
    let mut out = Converted {
        root: cfg.root_namespace.clone(),
        ..Converted::default()
    };
    let mut seen = HashSet::new();
    for (i, obj) in cfg.istio.iter().enumerate() {
        let at = format!("istio[{i}]");
        check_meta(obj, &at)?;
        if !seen.insert((obj.kind(), &obj.metadata.namespace, &obj.metadata.name)) {
            return Err(invalid(
                format!("{at}.metadata.name"),
                format!(
                    "{} {}/{} is listed twice",
                    obj.kind(),
                    obj.metadata.namespace,
                    obj.metadata.name
                ),
            ));
        }
        match &obj.spec {
            Spec::AuthorizationPolicy(spec) => authorization_policy(cfg, obj, spec, &at, &mut out)?,
            Spec::PeerAuthentication(spec) => {
                if let Some(p) =
                    peer_authentication(&cfg.root_namespace, obj, spec, &at, &mut out.warnings)?
                {
                    out.peers.push(p);
                }
            }
            _ => {}
        }
    }
    if cfg
        .istio
        .iter()
        .any(|o| o.kind() == ObjectKind::PeerAuthentication)
    {
        out.policies.push(static_strict(&cfg.root_namespace));
    }
    out.convert_peers();
    Ok(out)
}

fn check_meta(obj: &IstioObject, at: &str) -> Result<(), Error> {
    obj.kind()
        .check_api_version(&obj.api_version)
        .map_err(|r| invalid(format!("{at}.apiVersion"), r))?;
    check_name(&obj.metadata.name).map_err(|r| invalid(format!("{at}.metadata.name"), r))?;
    check_name(&obj.metadata.namespace).map_err(|r| invalid(format!("{at}.metadata.namespace"), r))
}

fn authorization_policy(
    cfg: &MeshConfig,
    obj: &IstioObject,
    spec: &AuthorizationPolicySpec,
    at: &str,
    out: &mut Converted,
) -> Result<(), Error> {
    let root = cfg.root_namespace.as_str();
    let (ns, name) = (&obj.metadata.namespace, &obj.metadata.name);
    let key = format!("{ns}/{name}");
    let action = spec.action.unwrap_or(PolicyAction::Allow);
    match (action, spec.provider.is_some()) {
        (PolicyAction::Custom, false) => {
            return Err(invalid(
                format!("{at}.spec.provider"),
                "action CUSTOM needs a provider",
            ))
        }
        (PolicyAction::Allow | PolicyAction::Deny | PolicyAction::Audit, true) => {
            return Err(invalid(
                format!("{at}.spec.provider"),
                "only with action CUSTOM",
            ))
        }
        _ => {}
    }
    let targeted = spec.targets().next().is_some();
    if spec.target_ref.is_some() && spec.target_refs.is_some() {
        return Err(invalid(
            format!("{at}.spec.targetRefs"),
            "use targetRef or targetRefs, not both",
        ));
    }
    if let Some(sel) = &spec.selector {
        if sel.match_labels.is_empty() {
            return Err(invalid(
                format!("{at}.spec.selector.matchLabels"),
                "an empty selector would apply to no pod; omit the selector for the whole namespace",
            ));
        }
        if targeted {
            return Err(invalid(
                format!("{at}.spec.selector"),
                "use selector or targetRef(s), not both",
            ));
        }
    }
    let dry_run = match obj
        .metadata
        .annotations
        .get(DRY_RUN_ANNOTATION)
        .map(String::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(invalid(
                format!("{at}.metadata.annotations.{DRY_RUN_ANNOTATION}"),
                format!("{other:?} is not \"true\" or \"false\""),
            ))
        }
    };
    let authz_action = if action == PolicyAction::Deny {
        Action::Deny
    } else {
        Action::Allow
    };
    if targeted {
        // Waypoints only: kept out of the node proxies' resources, as istiod does.
        out.targeted
            .push(l7::targeted(cfg, obj, spec, action, dry_run, at)?);
        return Ok(());
    }
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        let at = format!("{at}.spec.rules[{r}]");
        let (converted, l7) = convert_rule(rule, ns, &at)?;
        if l7.is_empty() {
            rules.push(converted);
        } else if authz_action == Action::Deny {
            out.warnings.push(format!(
                "AuthorizationPolicy {key}: {at} uses HTTP attributes ({}) a node proxy cannot see; \
                 the DENY rule is enforced without them (it denies more than requested)",
                l7.join(", ")
            ));
            rules.push(converted);
        } else {
            out.warnings.push(format!(
                "AuthorizationPolicy {key}: {at} uses HTTP attributes ({}) a node proxy cannot see; \
                 the ALLOW rule is dropped (it allows less than requested)",
                l7.join(", ")
            ));
        }
    }
    if matches!(action, PolicyAction::Audit | PolicyAction::Custom) {
        out.warnings.push(format!(
            "AuthorizationPolicy {key}: node proxies do not support the {action:?} action; not sent"
        ));
        return Ok(());
    }
    let scope = match (&spec.selector, ns == root) {
        (Some(sel), _) => {
            out.selector_policies.push(SelectorPolicy {
                key,
                namespace: ns.clone(),
                labels: sel.match_labels.clone(),
            });
            Scope::WorkloadSelector
        }
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    out.policies.push(Policy {
        name: name.clone(),
        namespace: ns.clone(),
        scope,
        action: authz_action,
        dry_run,
        rules,
    });
    Ok(())
}

/// One Istio rule → one rule; also returns the L7 attributes it used (L7 parts left out).
fn convert_rule(rule: &RuleSpec, ns: &str, at: &str) -> Result<(Rule, Vec<String>), Error> {
    let mut l7 = Vec::new();
    let mut clauses = Vec::new();
    // A clause with an entry made only of L7 attributes matches anything (for DENY: drop the clause).
    let mut to = Clause::default();
    let mut to_anything = false;
    for (k, entry) in rule.to.iter().enumerate() {
        let at = format!("{at}.to[{k}].operation");
        let op = entry
            .operation
            .as_ref()
            .ok_or_else(|| invalid(&at, "required"))?;
        let m = operation(op, &at, &mut l7)?;
        to_anything |= m.is_empty();
        to.matches.push(m);
    }
    if !rule.to.is_empty() && !to_anything {
        clauses.push(to);
    }
    let mut from = Clause::default();
    let mut from_anything = false;
    for (k, entry) in rule.from.iter().enumerate() {
        let at = format!("{at}.from[{k}].source");
        let src = entry
            .source
            .as_ref()
            .ok_or_else(|| invalid(&at, "required"))?;
        let m = source(src, ns, &at, &mut l7)?;
        from_anything |= m.is_empty();
        from.matches.push(m);
    }
    if !rule.from.is_empty() && !from_anything {
        clauses.push(from);
    }
    for (k, cond) in rule.when.iter().enumerate() {
        if let Some(m) = condition(cond, &format!("{at}.when[{k}]"), &mut l7)? {
            clauses.push(Clause { matches: vec![m] });
        }
    }
    l7.sort();
    l7.dedup();
    Ok((Rule { clauses }, l7))
}

fn operation(op: &OperationSpec, at: &str, l7: &mut Vec<String>) -> Result<Match, Error> {
    let http = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    for (field, values) in http {
        non_empty_strings(values, &format!("{at}.{field}"))?;
        if !values.is_empty() {
            l7.push(field.to_string());
        }
    }
    let m = Match {
        destination_ports: ports(&op.ports, &format!("{at}.ports"))?,
        not_destination_ports: ports(&op.not_ports, &format!("{at}.notPorts"))?,
        ..Match::default()
    };
    if m.is_empty() && http.iter().all(|(_, v)| v.is_empty()) {
        return Err(invalid(
            at,
            "an empty operation matches nothing; give at least one field",
        ));
    }
    Ok(m)
}

fn source(src: &SourceSpec, ns: &str, at: &str, l7: &mut Vec<String>) -> Result<Match, Error> {
    let http = [
        ("requestPrincipals", &src.request_principals),
        ("notRequestPrincipals", &src.not_request_principals),
    ];
    for (field, values) in http {
        strings(values, &format!("{at}.{field}"))?;
        if !values.is_empty() {
            l7.push(field.to_string());
        }
    }
    let remote = [
        ("remoteIpBlocks", &src.remote_ip_blocks),
        ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
    ];
    for (field, values) in remote {
        cidrs(values, &format!("{at}.{field}"))?;
        if !values.is_empty() {
            l7.push(field.to_string());
        }
    }
    let f = |field: &str| format!("{at}.{field}");
    let m = Match {
        principals: principals(&src.principals, &f("principals"))?,
        not_principals: principals(&src.not_principals, &f("notPrincipals"))?,
        namespaces: strings(&src.namespaces, &f("namespaces"))?,
        not_namespaces: strings(&src.not_namespaces, &f("notNamespaces"))?,
        service_accounts: service_accounts(&src.service_accounts, ns, &f("serviceAccounts"))?,
        not_service_accounts: service_accounts(
            &src.not_service_accounts,
            ns,
            &f("notServiceAccounts"),
        )?,
        source_ips: cidrs(&src.ip_blocks, &f("ipBlocks"))?,
        not_source_ips: cidrs(&src.not_ip_blocks, &f("notIpBlocks"))?,
        ..Match::default()
    };
    if m.is_empty() && http.iter().chain(&remote).all(|(_, v)| v.is_empty()) {
        return Err(invalid(
            at,
            "an empty source matches nothing; give at least one field",
        ));
    }
    Ok(m)
}

/// A `when` condition: `Some(match)` for L4 keys, `None` (recorded in `l7`) for the others.
fn condition(cond: &Condition, at: &str, l7: &mut Vec<String>) -> Result<Option<Match>, Error> {
    let key = cond.key.as_str();
    if cond.values.is_empty() && cond.not_values.is_empty() {
        return Err(invalid(at, "a condition needs values or notValues"));
    }
    let text = |v: &[Scalar]| v.iter().map(Scalar::text).collect::<Vec<_>>();
    let (values, not_values) = (text(&cond.values), text(&cond.not_values));
    let (vf, nf) = (format!("{at}.values"), format!("{at}.notValues"));
    let m = match key {
        "source.ip" => Match {
            source_ips: cidrs(&values, &vf)?,
            not_source_ips: cidrs(&not_values, &nf)?,
            ..Match::default()
        },
        "destination.ip" => Match {
            destination_ips: cidrs(&values, &vf)?,
            not_destination_ips: cidrs(&not_values, &nf)?,
            ..Match::default()
        },
        "destination.port" => Match {
            destination_ports: ports(&cond.values, &vf)?,
            not_destination_ports: ports(&cond.not_values, &nf)?,
            ..Match::default()
        },
        "source.namespace" => Match {
            namespaces: strings(&values, &vf)?,
            not_namespaces: strings(&not_values, &nf)?,
            ..Match::default()
        },
        "source.principal" => Match {
            principals: principals(&values, &vf)?,
            not_principals: principals(&not_values, &nf)?,
            ..Match::default()
        },
        _ if L7_WHEN_KEYS.contains(&key) || L7_WHEN_PREFIXES.iter().any(|p| key.starts_with(p)) => {
            non_empty_strings(&values, &vf)?;
            non_empty_strings(&not_values, &nf)?;
            l7.push(key.to_string());
            return Ok(None);
        }
        _ => {
            return Err(invalid(
                format!("{at}.key"),
                format!("unknown attribute {key:?} (L4 attributes: {L4_WHEN_KEYS:?})"),
            ))
        }
    };
    Ok(Some(m))
}

fn non_empty_strings(values: &[String], at: &str) -> Result<(), Error> {
    match values.iter().position(String::is_empty) {
        Some(k) => Err(invalid(format!("{at}[{k}]"), "must not be empty")),
        None => Ok(()),
    }
}

/// Istio's string forms: `*` presence, `*x` suffix, `x*` prefix, else exact.
fn strings(values: &[String], at: &str) -> Result<Vec<StringMatch>, Error> {
    non_empty_strings(values, at)?;
    values
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let m = if v == "*" {
                StringMatch::Presence
            } else if let Some(s) = v.strip_prefix('*') {
                StringMatch::Suffix(s.to_string())
            } else if let Some(p) = v.strip_suffix('*') {
                StringMatch::Prefix(p.to_string())
            } else {
                StringMatch::Exact(v.clone())
            };
            let inner = match &m {
                StringMatch::Suffix(s) | StringMatch::Prefix(s) | StringMatch::Exact(s) => {
                    s.contains('*')
                }
                StringMatch::Presence => false,
            };
            if inner {
                return Err(invalid(
                    format!("{at}[{k}]"),
                    format!("{v:?}: '*' is only allowed alone, first or last"),
                ));
            }
            Ok(m)
        })
        .collect()
}

fn principals(values: &[String], at: &str) -> Result<Vec<StringMatch>, Error> {
    if let Some(k) = values.iter().position(|v| v.starts_with("spiffe://")) {
        return Err(invalid(
            format!("{at}[{k}]"),
            "principals are written without spiffe:// (e.g. cluster.local/ns/default/sa/sleep)",
        ));
    }
    strings(values, at)
}

/// `ns/sa`, or `sa` in the policy's namespace.
fn service_accounts(
    values: &[String],
    ns: &str,
    at: &str,
) -> Result<Vec<ServiceAccountMatch>, Error> {
    non_empty_strings(values, at)?;
    values
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let (namespace, account) = v.split_once('/').unwrap_or((ns, v));
            if namespace.is_empty() || account.is_empty() || account.contains('/') {
                return Err(invalid(
                    format!("{at}[{k}]"),
                    format!("{v:?} is not <serviceAccount> or <namespace>/<serviceAccount>"),
                ));
            }
            Ok(ServiceAccountMatch {
                namespace: namespace.to_string(),
                service_account: account.to_string(),
            })
        })
        .collect()
}

/// An address (`10.0.0.1`, whole-length) or a CIDR (`10.0.0.0/8`).
fn cidrs(values: &[String], at: &str) -> Result<Vec<IpNet>, Error> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let parsed = if v.contains('/') {
                v.parse::<IpNet>().ok()
            } else {
                v.parse::<IpAddr>().ok().map(IpNet::from)
            };
            parsed.ok_or_else(|| {
                invalid(
                    format!("{at}[{k}]"),
                    format!("{v:?} is not an IP address or CIDR"),
                )
            })
        })
        .collect()
}

fn ports(values: &[Scalar], at: &str) -> Result<Vec<u16>, Error> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let text = v.text();
            match text.parse::<u16>() {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(invalid(
                    format!("{at}[{k}]"),
                    format!("{text:?} is not a port number (1-65535)"),
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
