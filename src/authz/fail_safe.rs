//! The fail-safe form of a policy that could not be used as sent: what the proxy enforces in place of a
//! refused policy, so that a refusal never widens access.
//!
//! Input: a [`Policy`] whose unusable match entries have been left out of their lists, and the lists
//! that lost entries ([`Unusable`]: match position and field). Output: a policy that allows no more than
//! the policy as sent could have (ALLOW) and denies no less (DENY), whatever the unusable entries meant.
//! Owner: authz; the xDS layer builds these for refused `Authorization` resources.
//!
//! An unusable entry is read as the worst case for access, list by list:
//! - ALLOW, positive list (`principals`, `sourceIps`, …): it matches nothing. The other entries of the
//!   list stay; if none is left, the whole match matches nothing (the list must not become an empty,
//!   pass-everything list). ztunnel drops the entry, and an emptied list then passes every connection.
//! - ALLOW, negative list (`notPrincipals`, …): it excludes everything, so the match matches nothing.
//!   ztunnel drops it, which removes an exclusion.
//! - DENY, positive list: it matches everything, so the field passes every connection (its negative
//!   list still applies). ztunnel drops it, which narrows the deny.
//! - DENY, negative list: it excludes nothing; the other exclusions stay (as in ztunnel).
//!
//! Then a DENY match left with no field (or sent with none) matches every connection, where ztunnel's
//! empty match never matches; an ALLOW match that matches nothing is stored as an empty match. A clause
//! matches if any of its matches does, a rule if all its clauses do, a policy if any rule does: so
//! narrowing an ALLOW's matches (widening a DENY's) narrows (widens) the whole policy the same way.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Action, Match, MatchField, MatchPosition, Policy, StringMatch};

/// A list of one [`Match`] that lost entries it could not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unusable {
    /// Where the match is.
    pub position: MatchPosition,
    /// The list.
    pub field: MatchField,
}

impl Match {
    /// A match that every connection passes: source address in `0.0.0.0/0` or `::/0`.
    pub fn every_connection() -> Match {
        Match {
            source_ips: vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())],
            ..Match::default()
        }
    }

    fn list_is_empty(&self, field: MatchField) -> bool {
        match field {
            MatchField::Namespaces => self.namespaces.is_empty(),
            MatchField::NotNamespaces => self.not_namespaces.is_empty(),
            MatchField::Principals => self.principals.is_empty(),
            MatchField::NotPrincipals => self.not_principals.is_empty(),
            MatchField::SourceIps => self.source_ips.is_empty(),
            MatchField::NotSourceIps => self.not_source_ips.is_empty(),
            MatchField::DestinationIps => self.destination_ips.is_empty(),
            MatchField::NotDestinationIps => self.not_destination_ips.is_empty(),
            MatchField::DestinationPorts => self.destination_ports.is_empty(),
            MatchField::NotDestinationPorts => self.not_destination_ports.is_empty(),
            MatchField::ServiceAccounts => self.service_accounts.is_empty(),
            MatchField::NotServiceAccounts => self.not_service_accounts.is_empty(),
        }
    }

    fn clear(&mut self, field: MatchField) {
        match field {
            MatchField::Namespaces => self.namespaces.clear(),
            MatchField::NotNamespaces => self.not_namespaces.clear(),
            MatchField::Principals => self.principals.clear(),
            MatchField::NotPrincipals => self.not_principals.clear(),
            MatchField::SourceIps => self.source_ips.clear(),
            MatchField::NotSourceIps => self.not_source_ips.clear(),
            MatchField::DestinationIps => self.destination_ips.clear(),
            MatchField::NotDestinationIps => self.not_destination_ips.clear(),
            MatchField::DestinationPorts => self.destination_ports.clear(),
            MatchField::NotDestinationPorts => self.not_destination_ports.clear(),
            MatchField::ServiceAccounts => self.service_accounts.clear(),
            MatchField::NotServiceAccounts => self.not_service_accounts.clear(),
        }
    }

    /// Leaves out the entries [`Policy::validate`] refuses (empty `Exact`/`Prefix`/`Suffix` values,
    /// service accounts with an empty part) and reports the lists that lost some.
    fn strip_refused(&mut self, position: MatchPosition, lost: &mut Vec<Unusable>) {
        let usable = |s: &StringMatch| match s {
            StringMatch::Exact(v) | StringMatch::Prefix(v) | StringMatch::Suffix(v) => {
                !v.is_empty()
            }
            StringMatch::Presence => true,
        };
        let strings = [
            (&mut self.namespaces, MatchField::Namespaces),
            (&mut self.not_namespaces, MatchField::NotNamespaces),
            (&mut self.principals, MatchField::Principals),
            (&mut self.not_principals, MatchField::NotPrincipals),
        ];
        for (list, field) in strings {
            let before = list.len();
            list.retain(usable);
            if list.len() != before {
                lost.push(Unusable { position, field });
            }
        }
        let accounts = [
            (&mut self.service_accounts, MatchField::ServiceAccounts),
            (
                &mut self.not_service_accounts,
                MatchField::NotServiceAccounts,
            ),
        ];
        for (list, field) in accounts {
            let before = list.len();
            list.retain(|sa| !sa.namespace.is_empty() && !sa.service_account.is_empty());
            if list.len() != before {
                lost.push(Unusable { position, field });
            }
        }
    }
}

impl Policy {
    /// The fail-safe form of this policy (see the module docs), given the lists that already lost
    /// unusable entries. Entries [`Policy::validate`] refuses are found and left out here too, so the
    /// result always validates.
    pub fn fail_safe(mut self, unusable: &[Unusable]) -> Policy {
        let action = self.action;
        for (r, rule) in self.rules.iter_mut().enumerate() {
            for (c, clause) in rule.clauses.iter_mut().enumerate() {
                for (i, m) in clause.matches.iter_mut().enumerate() {
                    let position = MatchPosition {
                        rule: r,
                        clause: c,
                        index: i,
                    };
                    let mut lost: Vec<Unusable> = unusable
                        .iter()
                        .filter(|u| u.position == position)
                        .copied()
                        .collect();
                    m.strip_refused(position, &mut lost);
                    let mut matches_nothing = false;
                    for u in &lost {
                        match (action, u.field.is_negative()) {
                            (Action::Allow, false) => {
                                matches_nothing |= m.list_is_empty(u.field);
                            }
                            (Action::Allow, true) => matches_nothing = true,
                            (Action::Deny, false) => m.clear(u.field),
                            (Action::Deny, true) => {}
                        }
                    }
                    match action {
                        Action::Allow if matches_nothing => *m = Match::default(),
                        Action::Deny if m.is_empty() => *m = Match::every_connection(),
                        _ => {}
                    }
                }
            }
        }
        self
    }
}

#[cfg(test)]
mod tests;
