//! PeerAuthentication → istiod's static STRICT policy, converted port-level policies, and the effective
//! mode per pod (mesh → namespace → workload; UNSET inherits). See `istio.rs` for what is mirrored.

use std::collections::{BTreeMap, HashSet};

use super::{
    invalid, Converted, IstioObject, MtlsMode, PeerInfo, CONVERTED_PEER_AUTHENTICATION_PREFIX,
    STATIC_STRICT_POLICY,
};
use crate::authz::{Action, Clause, Match, Policy, Rule, Scope, StringMatch};
use crate::control_plane::config::{Error, Labels, WorkloadSpec};
use crate::control_plane::objects::security::PeerAuthenticationSpec;

pub(super) fn peer_authentication(
    root: &str,
    obj: &IstioObject,
    spec: &PeerAuthenticationSpec,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<PeerInfo>, Error> {
    let (ns, name) = (&obj.metadata.namespace, &obj.metadata.name);
    // As istiod: a selector without labels is namespace-wide.
    let selector = spec
        .selector
        .as_ref()
        .filter(|s| !s.match_labels.is_empty())
        .map(|s| s.match_labels.clone());
    let mut ports = BTreeMap::new();
    for (port, mtls) in spec.port_level_mtls.iter().flatten() {
        let p = u16::try_from(*port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                invalid(
                    format!("{at}.spec.portLevelMtls.{port}"),
                    "not a port number (1-65535)",
                )
            })?;
        ports.insert(p, mtls.mode);
    }
    if !ports.is_empty() && selector.is_none() {
        return Err(invalid(
            format!("{at}.spec.portLevelMtls"),
            "port-level mTLS needs a selector (namespace and mesh policies apply to every port)",
        ));
    }
    if ns == root && selector.is_some() {
        warnings.push(format!(
            "PeerAuthentication {ns}/{name}: a selector in the root namespace is ignored (as by istiod)"
        ));
        return Ok(None);
    }
    Ok(Some(PeerInfo {
        name: name.clone(),
        namespace: ns.clone(),
        selector,
        mode: spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default(),
        ports,
        converted: None,
    }))
}

pub(super) fn deny_no_identity() -> Match {
    Match {
        not_principals: vec![StringMatch::Presence],
        ..Match::default()
    }
}

/// istiod's static STRICT policy.
pub(super) fn static_strict(root: &str) -> Policy {
    Policy {
        name: STATIC_STRICT_POLICY.into(),
        namespace: root.into(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![deny_no_identity()],
            }],
        }],
    }
}

impl Converted {
    /// The first namespace-wide policy of `ns` (mesh-wide for the root namespace).
    fn wide(&self, ns: &str) -> Option<&PeerInfo> {
        self.peers
            .iter()
            .find(|p| p.namespace == ns && p.selector.is_none())
    }

    /// Effective STRICT for pods of `ns` before any selector policy: mesh, then namespace; UNSET inherits.
    fn parent_strict(&self, ns: &str) -> bool {
        let mut strict = false;
        for level in [
            self.wide(&self.root),
            (ns != self.root).then(|| self.wide(ns)).flatten(),
        ] {
            match level.map(|p| p.mode) {
                None | Some(MtlsMode::Unset) => {}
                Some(mode) => strict = mode == MtlsMode::Strict,
            }
        }
        strict
    }

    pub(super) fn convert_peers(&mut self) {
        let mut seen_wide = HashSet::new();
        for p in &self.peers {
            if p.selector.is_none() && !seen_wide.insert(p.namespace.clone()) {
                self.warnings.push(format!(
                    "PeerAuthentication {}/{}: another namespace-wide policy comes first in the file and wins",
                    p.namespace, p.name
                ));
            }
        }
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if p.selector.is_none() || p.ports.is_empty() {
                continue;
            }
            let top_strict = match p.mode {
                MtlsMode::Strict => true,
                MtlsMode::Unset => self.parent_strict(&p.namespace),
                MtlsMode::Permissive | MtlsMode::Disable => false,
            };
            let rules = if top_strict {
                let exceptions: Vec<Clause> = p
                    .ports
                    .iter()
                    .filter(|(_, m)| matches!(m, MtlsMode::Permissive | MtlsMode::Disable))
                    .map(|(port, _)| Clause {
                        matches: vec![Match {
                            not_destination_ports: vec![*port],
                            ..Match::default()
                        }],
                    })
                    .collect();
                if exceptions.is_empty() {
                    continue; // every port STRICT: the static policy says it all
                }
                let mut clauses = vec![Clause {
                    matches: vec![deny_no_identity()],
                }];
                clauses.extend(exceptions);
                vec![Rule { clauses }]
            } else {
                p.ports
                    .iter()
                    .filter(|(_, m)| **m == MtlsMode::Strict)
                    .map(|(port, _)| Rule {
                        clauses: vec![Clause {
                            matches: vec![Match {
                                not_principals: vec![StringMatch::Presence],
                                destination_ports: vec![*port],
                                ..Match::default()
                            }],
                        }],
                    })
                    .collect()
            };
            if rules.is_empty() {
                continue;
            }
            let policy = Policy {
                name: format!("{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", p.name),
                namespace: p.namespace.clone(),
                scope: Scope::WorkloadSelector,
                action: Action::Deny,
                dry_run: false,
                rules,
            };
            self.peers[i].converted = Some(policy.key());
            self.policies.push(policy);
        }
    }

    /// The keys a pod lists in `authorization_policies`: its selector AuthorizationPolicies (its namespace
    /// and the root namespace, sorted), then its PeerAuthentication policy (static STRICT or converted).
    pub fn keys_for(&self, w: &WorkloadSpec) -> Vec<String> {
        let selects = |labels: &Labels| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v));
        let mut keys: Vec<String> = self
            .selector_policies
            .iter()
            .filter(|s| {
                (s.namespace == w.namespace || s.namespace == self.root) && selects(&s.labels)
            })
            .map(|s| s.key.clone())
            .collect();
        keys.sort();
        let workload = self.peers.iter().find(|p| {
            p.namespace == w.namespace
                && p.namespace != self.root
                && p.selector.as_ref().is_some_and(selects)
        });
        let mut strict = self.parent_strict(&w.namespace);
        if let Some(p) = workload {
            match p.mode {
                MtlsMode::Strict => strict = true,
                MtlsMode::Permissive | MtlsMode::Disable => strict = false,
                MtlsMode::Unset => {}
            }
            if let Some(key) = &p.converted {
                keys.push(key.clone());
                return keys; // the converted policy carries the STRICT part itself
            }
        }
        if strict {
            keys.push(format!("{}/{STATIC_STRICT_POLICY}", self.root));
        }
        keys
    }
}
