//! The YAML shape of the `istio:` objects: Istio's `AuthorizationPolicy` and `PeerAuthentication` as users
//! write them (camelCase, unknown fields refused, so serde's error names the path, e.g.
//! `istio[2].spec.rules[0].from[0].source: unknown field \`principalz\``). Semantics live in `istio.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::control_plane::config::Labels;

/// One Istio object of the `istio:` list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioObject {
    /// `security.istio.io/v1` or `security.istio.io/v1beta1`.
    pub api_version: String,
    /// What it is.
    pub kind: Kind,
    /// Name, namespace, annotations.
    pub metadata: ObjectMeta,
    /// The spec of either kind; fields of the other kind are refused.
    #[serde(default)]
    pub spec: Spec,
}

/// The kinds understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum Kind {
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
}

/// Kubernetes object metadata (the parts that matter here).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Object name.
    pub name: String,
    /// Object namespace (required: there is no kubectl context to default it).
    pub namespace: String,
    /// Labels (kept for completeness; unused).
    #[serde(default)]
    pub labels: Labels,
    /// Annotations (`istio.io/dry-run`).
    #[serde(default)]
    pub annotations: Labels,
}

/// The union of both kinds' spec fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// Pods (by labels) the policy applies to.
    pub selector: Option<Selector>,
    /// AuthorizationPolicy: waypoint binding (not for node proxies).
    pub target_ref: Option<TargetRef>,
    /// AuthorizationPolicy: waypoint bindings (not for node proxies).
    pub target_refs: Option<Vec<TargetRef>>,
    /// AuthorizationPolicy: ALLOW (default), DENY, AUDIT, CUSTOM.
    pub action: Option<PolicyAction>,
    /// AuthorizationPolicy: the CUSTOM provider.
    pub provider: Option<Provider>,
    /// AuthorizationPolicy rules.
    pub rules: Option<Vec<RuleSpec>>,
    /// PeerAuthentication: workload-wide mode.
    pub mtls: Option<MtlsSpec>,
    /// PeerAuthentication: per-port modes (needs a selector). Keys may be numbers (`9080:`) or strings
    /// (`"9080":`, as Kubernetes' JSON and anything that round-trips through JSON writes them).
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

/// A string or a number as written (`ports: [8080]` or `ports: ["8080"]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// A number.
    Number(u64),
    /// A string.
    Text(String),
}

impl Scalar {
    pub(super) fn text(&self) -> String {
        match self {
            Scalar::Number(n) => n.to_string(),
            Scalar::Text(s) => s.clone(),
        }
    }
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
