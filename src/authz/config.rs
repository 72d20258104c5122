//! The YAML form of a [`Policy`] in ztunnel's local config file, and policy validation.
//!
//! Input: one element of the `policies:` list, e.g.
//!
//! ```yaml
//! - name: deny-9999
//!   namespace: default
//!   scope: Namespace          # Global | Namespace | WorkloadSelector
//!   action: Deny              # Allow | Deny
//!   dryRun: false             # optional, default false
//!   rules:                    # rules -> clauses -> matches
//!   - - - destinationPorts: [9999]
//!         principals: [!Exact "cluster.local/ns/default/sa/productpage"]
//!         notPrincipals: [!Presence []]
//!         sourceIps: ["10.0.0.0/8"]
//!         serviceAccounts: [{namespace: default, serviceAccount: sleep}]
//! ```
//!
//! Match fields are ztunnel's (`serde(rename_all = "camelCase")` of the proto names:
//! `namespaces`, `notNamespaces`, `principals`, `notPrincipals`, `sourceIps`, `notSourceIps`,
//! `destinationIps`, `notDestinationIps`, `destinationPorts`, `notDestinationPorts`,
//! `serviceAccounts`, `notServiceAccounts`), all optional. String matches are YAML-tagged enums
//! (`!Exact v`, `!Prefix v`, `!Suffix v`, `!Presence []`), exactly as serde_yaml writes
//! ztunnel's `StringMatch`.
//!
//! Output: a validated [`Policy`], or a serde error wrapping an [`Error`] that names the policy,
//! the match position and the field.

use ipnet::IpNet;

use super::{
    Action, Clause, Error, Match, MatchField, MatchPosition, Policy, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};

/// A policy as written in YAML, before CIDR parsing and validation.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawPolicy {
    name: String,
    namespace: String,
    scope: Scope,
    action: Action,
    #[serde(default)]
    dry_run: bool,
    rules: Vec<Vec<Vec<RawMatch>>>,
}

/// A match as written in YAML: CIDRs still strings.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct RawMatch {
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    source_ips: Vec<String>,
    not_source_ips: Vec<String>,
    destination_ips: Vec<String>,
    not_destination_ips: Vec<String>,
    destination_ports: Vec<u16>,
    not_destination_ports: Vec<u16>,
    service_accounts: Vec<ServiceAccountMatch>,
    not_service_accounts: Vec<ServiceAccountMatch>,
}

/// ztunnel's serde shape of a string match (`Presence()` is a zero-field tuple variant, hence
/// `!Presence []`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename = "StringMatch")]
pub(super) enum RawStringMatch {
    Prefix(String),
    Suffix(String),
    Exact(String),
    Presence(),
}

impl From<RawStringMatch> for StringMatch {
    fn from(raw: RawStringMatch) -> Self {
        match raw {
            RawStringMatch::Prefix(s) => StringMatch::Prefix(s),
            RawStringMatch::Suffix(s) => StringMatch::Suffix(s),
            RawStringMatch::Exact(s) => StringMatch::Exact(s),
            RawStringMatch::Presence() => StringMatch::Presence,
        }
    }
}

impl From<StringMatch> for RawStringMatch {
    fn from(m: StringMatch) -> Self {
        match m {
            StringMatch::Prefix(s) => RawStringMatch::Prefix(s),
            StringMatch::Suffix(s) => RawStringMatch::Suffix(s),
            StringMatch::Exact(s) => RawStringMatch::Exact(s),
            StringMatch::Presence => RawStringMatch::Presence(),
        }
    }
}

impl TryFrom<RawPolicy> for Policy {
    type Error = Error;

    fn try_from(raw: RawPolicy) -> Result<Self, Error> {
        let mut policy = Policy {
            name: raw.name,
            namespace: raw.namespace,
            scope: raw.scope,
            action: raw.action,
            dry_run: raw.dry_run,
            rules: Vec::with_capacity(raw.rules.len()),
        };
        for (r, raw_rule) in raw.rules.into_iter().enumerate() {
            let mut rule = Rule {
                clauses: Vec::with_capacity(raw_rule.len()),
            };
            for (c, raw_clause) in raw_rule.into_iter().enumerate() {
                let mut clause = Clause {
                    matches: Vec::with_capacity(raw_clause.len()),
                };
                for (i, raw_match) in raw_clause.into_iter().enumerate() {
                    let position = MatchPosition {
                        rule: r,
                        clause: c,
                        index: i,
                    };
                    clause
                        .matches
                        .push(raw_match.into_match(&policy, position)?);
                }
                rule.clauses.push(clause);
            }
            policy.rules.push(rule);
        }
        policy.validate()?;
        Ok(policy)
    }
}

impl RawMatch {
    fn into_match(self, policy: &Policy, position: MatchPosition) -> Result<Match, Error> {
        let cidrs = |values: Vec<String>, field: MatchField| -> Result<Vec<IpNet>, Error> {
            values
                .into_iter()
                .map(|value| match value.parse::<IpNet>() {
                    Ok(net) => Ok(net),
                    Err(_) => Err(Error::InvalidCidr {
                        policy: policy.key(),
                        position,
                        field,
                        value,
                    }),
                })
                .collect()
        };
        Ok(Match {
            namespaces: self.namespaces,
            not_namespaces: self.not_namespaces,
            principals: self.principals,
            not_principals: self.not_principals,
            source_ips: cidrs(self.source_ips, MatchField::SourceIps)?,
            not_source_ips: cidrs(self.not_source_ips, MatchField::NotSourceIps)?,
            destination_ips: cidrs(self.destination_ips, MatchField::DestinationIps)?,
            not_destination_ips: cidrs(self.not_destination_ips, MatchField::NotDestinationIps)?,
            destination_ports: self.destination_ports,
            not_destination_ports: self.not_destination_ports,
            service_accounts: self.service_accounts,
            not_service_accounts: self.not_service_accounts,
        })
    }
}

impl Policy {
    /// Refuses values that ztunnel would silently drop or never match, widening access:
    /// empty `Exact`/`Prefix`/`Suffix` strings and service-account matches with an empty part.
    /// (CIDRs are typed here; the YAML layer refuses unparsable ones.)
    pub fn validate(&self) -> Result<(), Error> {
        for (r, rule) in self.rules.iter().enumerate() {
            for (c, clause) in rule.clauses.iter().enumerate() {
                for (i, m) in clause.matches.iter().enumerate() {
                    let position = MatchPosition {
                        rule: r,
                        clause: c,
                        index: i,
                    };
                    self.validate_match(m, position)?;
                }
            }
        }
        Ok(())
    }

    fn validate_match(&self, m: &Match, position: MatchPosition) -> Result<(), Error> {
        // An empty match never matches: harmless in an ALLOW, but in a DENY it silently denies nothing.
        if self.action == Action::Deny && m.is_empty() {
            return Err(Error::EmptyDenyMatch {
                policy: self.key(),
                position,
            });
        }
        let strings = [
            (&m.namespaces, MatchField::Namespaces),
            (&m.not_namespaces, MatchField::NotNamespaces),
            (&m.principals, MatchField::Principals),
            (&m.not_principals, MatchField::NotPrincipals),
        ];
        for (list, field) in strings {
            for s in list {
                let kind = match s {
                    StringMatch::Exact(v) if v.is_empty() => "Exact",
                    StringMatch::Prefix(v) if v.is_empty() => "Prefix",
                    StringMatch::Suffix(v) if v.is_empty() => "Suffix",
                    _ => continue,
                };
                return Err(Error::EmptyStringMatch {
                    policy: self.key(),
                    position,
                    field,
                    kind,
                });
            }
        }
        let accounts = [
            (&m.service_accounts, MatchField::ServiceAccounts),
            (&m.not_service_accounts, MatchField::NotServiceAccounts),
        ];
        for (list, field) in accounts {
            if list
                .iter()
                .any(|sa| sa.namespace.is_empty() || sa.service_account.is_empty())
            {
                return Err(Error::EmptyServiceAccountMatch {
                    policy: self.key(),
                    position,
                    field,
                });
            }
        }
        Ok(())
    }
}
