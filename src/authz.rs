//! L4 authorization: ztunnel-compatible authorization policies, indexed per config snapshot and
//! evaluated for every inbound connection.
//!
//! Owner: the authz module (the proxy calls [`PolicySet::check`]; `state` builds the [`PolicySet`]).
//!
//! **Inputs.** [`Policy`] values, either deserialized from the `policies:` list of ztunnel's local
//! config file (`LOCAL_XDS_PATH`; YAML shape documented in `authz/config.rs`) or built by the
//! xDS layer from `istio.security.Authorization`. Per connection: the destination workload's namespace, the
//! policy keys listed in its `authorization_policies`, and a [`Connection`] (addresses, peer
//! identity).
//!
//! **Outputs.** A [`PolicySet`] (immutable, cheap to share in an `Arc`) and, per connection, a
//! [`Decision`]. Matches of dry-run policies and deny decisions are logged with `tracing`
//! (target `authz`).
//!
//! **Semantics** (ztunnel `src/rbac.rs` + `src/state.rs::assert_rbac`, Istio's documented order):
//! 1. Applicable policies: `Global` ones apply to every workload, whatever namespace the policy
//!    is in (ztunnel indexes them under `""` and checks no root namespace); `Namespace` ones to
//!    workloads in the policy's namespace; any policy whose key (`namespace/name`) is listed in the workload's
//!    `authorization_policies` (that is how `WorkloadSelector` policies apply). Like ztunnel, a
//!    `Namespace` policy whose namespace is `""` is indexed under the global key `""` and so
//!    applies everywhere; an unknown listed key is skipped with a warning.
//! 2. Matching dry-run DENY policies are only logged. Then any matching DENY policy denies
//!    ([`DenyReason::ExplicitDeny`]). Matching dry-run ALLOW policies are only logged. If no
//!    (non-dry-run) ALLOW policy applies, the connection is allowed; if one matches, allowed;
//!    otherwise denied ([`DenyReason::NoAllowMatch`]). (This dry-run handling is Istio's
//!    documented one; the ztunnel `assert_rbac` versions read while writing this partition by
//!    action only and never consult `dry_run`, i.e. they enforce dry-run policies.)
//! 3. A policy matches if ANY rule matches (zero rules: never). A rule matches if ALL its clauses
//!    match (zero clauses: always). A clause matches if ANY of its [`Match`]es matches (zero
//!    matches: always; an all-empty `Match`: never). In a `Match`, every kind of field must pass:
//!    (positive list empty OR any entry matches) AND (no negative entry matches).
//! 4. Principals compare against the peer identity without `spiffe://`; namespaces against its
//!    namespace (`""` without identity); service accounts against namespace + account. Without an
//!    identity no principal, namespace or service-account entry matches, so positive lists fail
//!    and negative (`not*`) lists pass, as in ztunnel (`notPrincipals: [!Presence []]` in a DENY
//!    policy therefore denies every connection that has no identity).
//!
//! **Deliberate differences from ztunnel.** Refusals, because each case would otherwise silently
//! widen access: ztunnel drops invalid CIDRs and empty string matches from the lists; here they are refused
//! with an [`Error`] naming the policy and field, as are service-account matches with an empty
//! part and two policies with the same key. In the YAML, unknown fields inside a match or a
//! service-account match are refused (ztunnel ignores them, so a misspelt field empties the
//! match). Leniency: `dryRun` may be omitted (default `false`; ztunnel requires it).
//!
//! **A refusal never widens access.** Refusing a policy must not leave the proxy allowing more than it
//! would with the policy: a missing ALLOW policy turns default-deny off for the workloads it selects, a
//! missing DENY denies nothing. Where a refused policy has no earlier good version to keep, the xDS layer
//! enforces its fail-safe form instead ([`Policy::fail_safe`], rules in `authz/fail_safe.rs`): an unusable
//! match entry can never let an ALLOW match through it (ztunnel drops the entry, which can turn a narrow
//! match into a match-all), and can only widen a DENY (ztunnel's dropped entry narrows it); a DENY match
//! left empty matches every connection. The local config refuses the whole file instead.

mod config;
mod fail_safe;
mod matching;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;
use tracing::{debug, info, trace};

use crate::identity::Identity;

pub use fail_safe::Unusable;

/// Where a policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Scope {
    /// Every workload in the mesh.
    Global,
    /// Workloads in the policy's namespace.
    Namespace,
    /// Workloads whose `authorization_policies` list the policy's key.
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Action {
    /// Allow the connection (and deny unmatched connections to workloads it applies to).
    Allow,
    /// Deny the connection.
    Deny,
}

/// One L4 authorization policy (ztunnel's `Authorization`).
///
/// Deserializes from ztunnel's local-config YAML and refuses invalid CIDRs and empty match
/// strings (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "config::RawPolicy", rename_all = "camelCase")]
pub struct Policy {
    /// Policy name.
    pub name: String,
    /// Policy namespace.
    pub namespace: String,
    /// Where the policy applies.
    pub scope: Scope,
    /// Allow or deny.
    pub action: Action,
    /// Log matches instead of enforcing them.
    pub dry_run: bool,
    /// The policy matches if any rule matches; with no rules it never matches.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// The policy key, `namespace/name`, as listed in `Workload.authorization_policies`.
    pub fn key(&self) -> String {
        let mut key = String::with_capacity(self.namespace.len() + 1 + self.name.len());
        key.push_str(&self.namespace);
        key.push('/');
        key.push_str(&self.name);
        key
    }
}

/// A rule matches if all its clauses match (a rule with no clauses always matches).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Rule {
    /// The clauses, all of which must match.
    pub clauses: Vec<Clause>,
}

/// A clause matches if any of its matches matches (a clause with no matches always matches).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Clause {
    /// The alternatives, any of which may match.
    pub matches: Vec<Match>,
}

/// Conditions on one connection. Each populated kind must pass; an all-empty `Match` never
/// matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    /// Source identity namespace is one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    /// Source identity namespace is none of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// Source principal (`td/ns/x/sa/y`) is one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    /// Source principal is none of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// Source IP is in one of these networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    /// Source IP is in none of these networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    /// Destination IP is in one of these networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    /// Destination IP is in none of these networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    /// Destination port is one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    /// Destination port is none of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
    /// Source identity is one of these service accounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Source identity is none of these service accounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

/// A string condition. In YAML: `!Exact v`, `!Prefix v`, `!Suffix v`, `!Presence []`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(from = "config::RawStringMatch", into = "config::RawStringMatch")]
pub enum StringMatch {
    /// Equal to the value.
    Exact(String),
    /// Starts with the value.
    Prefix(String),
    /// Ends with the value.
    Suffix(String),
    /// Non-empty.
    Presence,
}

/// A service account: source identity namespace and service account, both equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    /// Namespace of the service account.
    pub namespace: String,
    /// Name of the service account.
    pub service_account: String,
}

/// The connection being authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection<'a> {
    /// Peer address (after PROXY-protocol/HBONE unwrapping).
    pub src: SocketAddr,
    /// Destination workload address and resolved target port.
    pub dst: SocketAddr,
    /// Peer identity from its certificate; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// Network of the destination (not used in matching; kept for logs).
    pub dst_network: &'a str,
}

impl fmt::Display for Connection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.src_identity {
            Some(id) => write!(f, "{}({})->{}", self.src, id, self.dst),
            None => write!(f, "{}(None)->{}", self.src, self.dst),
        }
    }
}

/// The outcome of [`PolicySet::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The connection may proceed.
    Allow,
    /// The connection must be refused.
    Deny(DenyReason),
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Why a connection was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy matched.
    ExplicitDeny {
        /// The key (`namespace/name`) of the first matching DENY policy.
        policy: String,
    },
    /// ALLOW policies apply to the workload, but none matched.
    NoAllowMatch,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::ExplicitDeny { policy } => write!(f, "explicitly denied by: {policy}"),
            DenyReason::NoAllowMatch => f.write_str("allow policies exist, but none allowed"),
        }
    }
}

/// A field of a [`Match`], named as in the YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MatchField {
    /// `namespaces`
    Namespaces,
    /// `notNamespaces`
    NotNamespaces,
    /// `principals`
    Principals,
    /// `notPrincipals`
    NotPrincipals,
    /// `sourceIps`
    SourceIps,
    /// `notSourceIps`
    NotSourceIps,
    /// `destinationIps`
    DestinationIps,
    /// `notDestinationIps`
    NotDestinationIps,
    /// `destinationPorts`
    DestinationPorts,
    /// `notDestinationPorts`
    NotDestinationPorts,
    /// `serviceAccounts`
    ServiceAccounts,
    /// `notServiceAccounts`
    NotServiceAccounts,
}

impl MatchField {
    /// The field's name in the YAML and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            MatchField::Namespaces => "namespaces",
            MatchField::NotNamespaces => "notNamespaces",
            MatchField::Principals => "principals",
            MatchField::NotPrincipals => "notPrincipals",
            MatchField::SourceIps => "sourceIps",
            MatchField::NotSourceIps => "notSourceIps",
            MatchField::DestinationIps => "destinationIps",
            MatchField::NotDestinationIps => "notDestinationIps",
            MatchField::DestinationPorts => "destinationPorts",
            MatchField::NotDestinationPorts => "notDestinationPorts",
            MatchField::ServiceAccounts => "serviceAccounts",
            MatchField::NotServiceAccounts => "notServiceAccounts",
        }
    }

    /// Whether this is an exclusion list (`not*`): a connection passes it if no entry matches.
    pub fn is_negative(self) -> bool {
        matches!(
            self,
            MatchField::NotNamespaces
                | MatchField::NotPrincipals
                | MatchField::NotSourceIps
                | MatchField::NotDestinationIps
                | MatchField::NotDestinationPorts
                | MatchField::NotServiceAccounts
        )
    }
}

impl fmt::Display for MatchField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where in a policy a [`Match`] sits: `rules[rule][clause][index]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchPosition {
    /// Index of the rule.
    pub rule: usize,
    /// Index of the clause in the rule.
    pub clause: usize,
    /// Index of the match in the clause.
    pub index: usize,
}

impl fmt::Display for MatchPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rules[{}][{}][{}]", self.rule, self.clause, self.index)
    }
}

/// A policy that is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A CIDR in an IP list does not parse as `address/prefix-length`.
    #[error(
        "policy {policy}: {position}.{field}: {value:?} is not a CIDR (address/prefix-length)"
    )]
    InvalidCidr {
        /// Policy key.
        policy: String,
        /// Position of the match.
        position: MatchPosition,
        /// The offending list.
        field: MatchField,
        /// The value as written.
        value: String,
    },
    /// An `Exact`/`Prefix`/`Suffix` string match has an empty value.
    #[error("policy {policy}: {position}.{field}: empty {kind} value (use !Presence [] to match any value)")]
    EmptyStringMatch {
        /// Policy key.
        policy: String,
        /// Position of the match.
        position: MatchPosition,
        /// The offending list.
        field: MatchField,
        /// `Exact`, `Prefix` or `Suffix`.
        kind: &'static str,
    },
    /// A service-account match has an empty namespace or service account.
    #[error("policy {policy}: {position}.{field}: service account match with empty namespace or serviceAccount")]
    EmptyServiceAccountMatch {
        /// Policy key.
        policy: String,
        /// Position of the match.
        position: MatchPosition,
        /// The offending list.
        field: MatchField,
    },
    /// A DENY policy holds a match with no field, which would match nothing.
    #[error("policy {policy}: {position}: an empty match in a DENY policy matches nothing (it would silently allow what it means to deny)")]
    EmptyDenyMatch {
        /// The policy key.
        policy: String,
        /// Where.
        position: MatchPosition,
    },
    /// Two policies have the same `namespace/name` key.
    #[error("policy {policy} is defined more than once")]
    DuplicateKey {
        /// Policy key.
        policy: String,
    },
}

/// A policy and its precomputed key.
#[derive(Debug)]
struct Entry {
    key: String,
    policy: Policy,
}

/// Which of the four evaluation phases a policy belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    DryRunDeny,
    Deny,
    DryRunAllow,
    Allow,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::DryRunDeny,
        Phase::Deny,
        Phase::DryRunAllow,
        Phase::Allow,
    ];

    fn of(policy: &Policy) -> Phase {
        match (policy.action, policy.dry_run) {
            (Action::Deny, true) => Phase::DryRunDeny,
            (Action::Deny, false) => Phase::Deny,
            (Action::Allow, true) => Phase::DryRunAllow,
            (Action::Allow, false) => Phase::Allow,
        }
    }

    fn index(self) -> usize {
        match self {
            Phase::DryRunDeny => 0,
            Phase::Deny => 1,
            Phase::DryRunAllow => 2,
            Phase::Allow => 3,
        }
    }
}

/// Indices of policies, bucketed by [`Phase`], in input order.
#[derive(Debug, Default)]
struct Group([Vec<usize>; 4]);

impl Group {
    fn push(&mut self, phase: Phase, idx: usize) {
        self.0[phase.index()].push(idx);
    }

    fn get(&self, phase: Phase) -> &[usize] {
        &self.0[phase.index()]
    }
}

/// The authorization policies of one config snapshot, indexed so that a check only looks at the
/// policies that apply to the destination workload.
#[derive(Debug, Default)]
pub struct PolicySet {
    entries: Vec<Entry>,
    /// Global policies (and, as in ztunnel, Namespace policies of namespace `""`).
    global: Group,
    /// Namespace-scoped policies by namespace (never the key `""`).
    by_namespace: HashMap<String, Group>,
    /// Every policy by key, whatever its scope.
    by_key: HashMap<String, usize>,
}

impl PolicySet {
    /// Validates and indexes `policies`. Refuses invalid match values (see [`Error`]) and
    /// duplicate keys.
    pub fn new(policies: Vec<Policy>) -> Result<Self, Error> {
        let mut set = PolicySet::default();
        for policy in policies {
            policy.validate()?;
            let key = policy.key();
            let idx = set.entries.len();
            if set.by_key.insert(key.clone(), idx).is_some() {
                return Err(Error::DuplicateKey { policy: key });
            }
            let phase = Phase::of(&policy);
            match policy.scope {
                Scope::Global => set.global.push(phase, idx),
                Scope::Namespace if policy.namespace.is_empty() => set.global.push(phase, idx),
                Scope::Namespace => set
                    .by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(phase, idx),
                Scope::WorkloadSelector => {}
            }
            set.entries.push(Entry { key, policy });
        }
        Ok(set)
    }

    /// Whether there are no policies.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The policy with key `namespace/name`.
    pub fn get(&self, key: &str) -> Option<&Policy> {
        self.by_key.get(key).map(|&i| &self.entries[i].policy)
    }

    /// All policies, in input order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.entries.iter().map(|e| &e.policy)
    }

    /// The policies that apply to a workload in `workload_namespace` listing
    /// `workload_policy_keys`, each once, in evaluation order within each phase
    /// (DENY dry-run, DENY, ALLOW dry-run, ALLOW).
    pub fn applicable<'s>(
        &'s self,
        workload_namespace: &'s str,
        workload_policy_keys: &'s [String],
    ) -> impl Iterator<Item = &'s Policy> + 's {
        Phase::ALL.into_iter().flat_map(move |phase| {
            self.in_phase(phase, workload_namespace, workload_policy_keys)
                .map(|e| &e.policy)
        })
    }

    /// Decides whether `conn` may reach a workload in `workload_namespace` whose
    /// `authorization_policies` are `workload_policy_keys`. Does not allocate unless it denies.
    pub fn check(
        &self,
        workload_namespace: &str,
        workload_policy_keys: &[String],
        conn: &Connection<'_>,
    ) -> Decision {
        for key in workload_policy_keys {
            if !self.by_key.contains_key(key.as_str()) {
                // Per connection, so not a warning: a workload can list a policy a moment before the
                // policy itself arrives over xDS, and a warn here would flood the log at every connection.
                debug!(target: "authz", policy = %key, "skipping unknown policy");
            }
        }
        let phase = |p| self.in_phase(p, workload_namespace, workload_policy_keys);

        for e in phase(Phase::DryRunDeny) {
            if e.policy.matches(conn) {
                info!(target: "authz", policy = %e.key, %conn, "dry-run: deny policy would deny");
            }
        }
        for e in phase(Phase::Deny) {
            if e.policy.matches(conn) {
                debug!(target: "authz", policy = %e.key, %conn, "deny policy match");
                return Decision::Deny(DenyReason::ExplicitDeny {
                    policy: e.key.clone(),
                });
            }
            trace!(target: "authz", policy = %e.key, "deny policy does not match");
        }
        for e in phase(Phase::DryRunAllow) {
            if e.policy.matches(conn) {
                info!(target: "authz", policy = %e.key, %conn, "dry-run: allow policy would allow");
            } else {
                info!(target: "authz", policy = %e.key, %conn, "dry-run: allow policy would not allow");
            }
        }
        let mut any_allow = false;
        for e in phase(Phase::Allow) {
            any_allow = true;
            if e.policy.matches(conn) {
                debug!(target: "authz", policy = %e.key, %conn, "allow policy match");
                return Decision::Allow;
            }
            trace!(target: "authz", policy = %e.key, "allow policy does not match");
        }
        if !any_allow {
            trace!(target: "authz", %conn, "no allow policies, allow");
            return Decision::Allow;
        }
        debug!(target: "authz", %conn, "allow policies exist, but none allowed");
        Decision::Deny(DenyReason::NoAllowMatch)
    }

    /// The applicable policies of one phase, in ztunnel's order: the workload's namespace, then
    /// global, then the workload's listed keys (skipping those already applicable by scope, and unknown keys).
    fn in_phase<'s>(
        &'s self,
        phase: Phase,
        workload_namespace: &'s str,
        workload_policy_keys: &'s [String],
    ) -> impl Iterator<Item = &'s Entry> + 's {
        let namespace = self
            .by_namespace
            .get(workload_namespace)
            .map(|g| g.get(phase))
            .unwrap_or_default();
        let listed = workload_policy_keys
            .iter()
            .filter_map(|k| self.by_key.get(k.as_str()))
            .map(|&i| &self.entries[i])
            .filter(move |e| {
                Phase::of(&e.policy) == phase && !applies_by_scope(&e.policy, workload_namespace)
            });
        namespace
            .iter()
            .chain(self.global.get(phase))
            .map(|&i| &self.entries[i])
            .chain(listed)
    }
}

/// Whether `policy` already applies to a workload in `namespace` through the global or namespace
/// index (so listing its key too must not evaluate it twice).
fn applies_by_scope(policy: &Policy, namespace: &str) -> bool {
    match policy.scope {
        Scope::Global => true,
        Scope::Namespace => policy.namespace.is_empty() || policy.namespace == namespace,
        Scope::WorkloadSelector => false,
    }
}
