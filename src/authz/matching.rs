//! Whether one [`Policy`] matches one [`Connection`] (ztunnel's `Authorization::matches`).
//!
//! Input: a policy and a connection. Output: `bool`. No allocation: the peer principal
//! (`td/ns/x/sa/y`) is compared piecewise instead of being formatted.

use crate::identity::Identity;

use super::{Connection, Match, Policy, ServiceAccountMatch, StringMatch};

impl Policy {
    /// Whether any rule matches `conn` (a policy with no rules never matches).
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.clauses.iter().all(|clause| {
                clause.matches.is_empty() || clause.matches.iter().any(|m| m.matches(conn))
            })
        })
    }
}

impl Match {
    /// Whether no field is populated (such a match never matches).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
    }

    /// Whether every populated kind passes for `conn`.
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let dst_ip = conn.dst.ip();
        let src_ip = conn.src.ip();
        let dst_port = conn.dst.port();
        let id = conn.src_identity;
        // Namespace of the peer, "" without identity (no valid StringMatch matches "").
        let ns = id.map(Identity::namespace).unwrap_or_default();
        passes(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(&dst_ip)
        }) && passes(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(&src_ip)
        }) && passes(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == dst_port
        }) && passes(&self.service_accounts, &self.not_service_accounts, |sa| {
            sa.matches(id)
        }) && passes(&self.principals, &self.not_principals, |p| {
            id.is_some_and(|id| p.matches_principal(id))
        }) && passes(&self.namespaces, &self.not_namespaces, |p| p.matches(ns))
    }
}

/// (positive empty OR any positive matches) AND no negative matches.
fn passes<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

impl ServiceAccountMatch {
    /// Namespace and service account both equal; never matches without an identity.
    pub fn matches(&self, id: Option<&Identity>) -> bool {
        id.is_some_and(|id| {
            id.namespace() == self.namespace && id.service_account() == self.service_account
        })
    }
}

impl StringMatch {
    /// Whether `value` satisfies this match.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(v) => value == v,
            StringMatch::Prefix(v) => value.starts_with(v.as_str()),
            StringMatch::Suffix(v) => value.ends_with(v.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// Whether the principal of `id` (`td/ns/x/sa/y`, no `spiffe://`) satisfies this match,
    /// without building the string.
    pub fn matches_principal(&self, id: &Identity) -> bool {
        let parts = [
            id.trust_domain(),
            "/ns/",
            id.namespace(),
            "/sa/",
            id.service_account(),
        ];
        let len: usize = parts.iter().map(|p| p.len()).sum();
        match self {
            StringMatch::Exact(v) => v.len() == len && starts_with(parts, v.as_bytes()),
            StringMatch::Prefix(v) => starts_with(parts, v.as_bytes()),
            StringMatch::Suffix(v) => ends_with(parts, v.as_bytes()),
            StringMatch::Presence => len > 0,
        }
    }
}

/// Whether the concatenation of `parts` starts with `pat`.
fn starts_with(parts: [&str; 5], mut pat: &[u8]) -> bool {
    for part in parts {
        let part = part.as_bytes();
        if pat.len() <= part.len() {
            return part.starts_with(pat);
        }
        if !pat.starts_with(part) {
            return false;
        }
        pat = &pat[part.len()..];
    }
    pat.is_empty()
}

/// Whether the concatenation of `parts` ends with `pat`.
fn ends_with(parts: [&str; 5], mut pat: &[u8]) -> bool {
    for part in parts.into_iter().rev() {
        let part = part.as_bytes();
        if pat.len() <= part.len() {
            return part.ends_with(pat);
        }
        if !pat.ends_with(part) {
            return false;
        }
        pat = &pat[..pat.len() - part.len()];
    }
    pat.is_empty()
}
