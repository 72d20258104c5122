//! The shapes of Istio's security objects: `AuthorizationPolicy` and `PeerAuthentication` specs as users
//! write them (camelCase, unknown fields refused). Meaning: `istio.rs` (node proxies) and `istio/l7.rs`
//! (waypoints).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Labels, Scalar};

/// An AuthorizationPolicy's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Pods (by labels) the policy applies to (node proxies only).
    pub selector: Option<Selector>,
    /// Waypoint binding (a waypoint Gateway, or a Service bound to one).
    pub target_ref: Option<TargetRef>,
    /// Waypoint bindings.
    pub target_refs: Option<Vec<TargetRef>>,
    /// ALLOW (default), DENY, AUDIT, CUSTOM.
    pub action: Option<PolicyAction>,
    /// The CUSTOM provider.
    pub provider: Option<Provider>,
    /// The rules (absent: none, which for ALLOW allows nothing).
    pub rules: Option<Vec<RuleSpec>>,
}

impl AuthorizationPolicySpec {
    /// The target references, from either field.
    pub fn targets(&self) -> impl Iterator<Item = &TargetRef> {
        self.target_ref
            .iter()
            .chain(self.target_refs.iter().flatten())
    }
}

/// A PeerAuthentication's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Pods (by labels) the policy applies to.
    pub selector: Option<Selector>,
    /// Workload-wide mode.
    pub mtls: Option<MtlsSpec>,
    /// Per-port modes (needs a selector). Keys may be numbers (`9080:`) or strings (`"9080":`, as
    /// Kubernetes' JSON and anything that round-trips through JSON writes them).
    #[serde(default, deserialize_with = "port_keys")]
    pub port_level_mtls: Option<BTreeMap<u32, MtlsSpec>>,
}

/// A `portLevelMtls` key as written: a number or a numeric string.
#[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(untagged)]
enum PortKey {
    Number(u32),
    Text(String),
}

fn port_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<u32, MtlsSpec>>, D::Error> {
    let Some(raw) = Option::<BTreeMap<PortKey, MtlsSpec>>::deserialize(d)? else {
        return Ok(None);
    };
    raw.into_iter()
        .map(|(k, v)| match k {
            PortKey::Number(n) => Ok((n, v)),
            PortKey::Text(t) => t
                .parse()
                .map(|n| (n, v))
                .map_err(|_| serde::de::Error::custom(format!("port {t:?} is not a number"))),
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// `selector: {matchLabels: {...}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Labels the pod must carry.
    #[serde(default)]
    pub match_labels: Labels,
}

/// A policy target reference (waypoint attachment).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// API group.
    #[serde(default)]
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
}

/// A CUSTOM action's provider.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    /// Provider name from mesh config.
    pub name: String,
}

/// AuthorizationPolicy actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyAction {
    /// Allow matching requests.
    Allow,
    /// Deny matching requests.
    Deny,
    /// Audit (not for ztunnel).
    Audit,
    /// External authorization (not for ztunnel).
    Custom,
}

/// An Istio rule: `from` AND `to` AND every `when`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RuleSpec {
    /// Sources, any of which may match.
    pub from: Vec<FromSpec>,
    /// Operations, any of which may match.
    pub to: Vec<ToSpec>,
    /// Conditions, all of which must match.
    pub when: Vec<Condition>,
}

/// `from: [{source: ...}]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromSpec {
    /// The source.
    pub source: Option<SourceSpec>,
}

/// `to: [{operation: ...}]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToSpec {
    /// The operation.
    pub operation: Option<OperationSpec>,
}

/// Istio's `Source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct SourceSpec {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

/// Istio's `Operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[allow(missing_docs)] // Istio's field names; see the Istio reference.
pub struct OperationSpec {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<Scalar>,
    pub not_ports: Vec<Scalar>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// Istio's `Condition`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Attribute name, e.g. `source.ip`.
    pub key: String,
    /// Any of these.
    #[serde(default)]
    pub values: Vec<Scalar>,
    /// None of these.
    #[serde(default)]
    pub not_values: Vec<Scalar>,
}

/// `mtls: {mode: ...}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    /// The mode (default UNSET: inherit).
    #[serde(default)]
    pub mode: MtlsMode,
}

/// PeerAuthentication modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    #[default]
    Unset,
    /// Plaintext only (for ztunnel: plaintext accepted).
    Disable,
    /// Plaintext and mTLS.
    Permissive,
    /// mTLS only.
    Strict,
}
