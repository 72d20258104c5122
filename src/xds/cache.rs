//! The resources the xDS client holds, per type, with the version each was received at, and how one
//! `DeltaDiscoveryResponse` changes them.
//!
//! Input: decoded responses. Output: a rebuilt [`State`] plus the per-resource rejections, or a refusal of
//! the whole response (nothing changed). Also the name → version maps sent as `initial_resource_versions`
//! on reconnect. Held values are `Arc`s so that trying a response on a copy of a map (and throwing it away
//! if the result is inconsistent) costs pointers, not workloads.
//!
//! A rejected resource (NACKed by name) never loosens what is enforced:
//! - if a good version of it is held, that version stays (xDS NACK semantics: keep the last good one);
//! - a rejected policy with no good version held is replaced by its fail-safe stand-in
//!   ([`convert::fail_safe_policy`]), so that a workload whose ALLOW policy was refused is not left with
//!   no ALLOW policy (allow everything), nor a refused DENY simply missing. Stand-ins are not reported in
//!   `initial_resource_versions`, so the control plane sends the policy again on reconnect; a good
//!   version or a removal replaces them. Rejected workloads and services are simply not held (traffic to
//!   or from a workload the state does not know is refused by the proxy).
//!
//! Known gap: a new policy past [`Limits::max_resources`](super::Limits) is refused without a stand-in
//! (holding one would break the bound), so it is missing for the workloads that list it (ztunnel has no
//! such limit).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use prost::Message;
use tracing::warn;

use super::convert::{self, Address};
use super::{ResourceError, ResponseError, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::authz::{Policy, PolicySet};
use crate::proto::discovery::{DeltaDiscoveryResponse, Resource};
use crate::proto::{security, workload};
use crate::state::State;

/// At most this many rejections are spelled out in a NACK; the rest are counted.
const MAX_NACK_ENTRIES: usize = 32;
/// A NACK's `error_detail.message` is cut at this many bytes (istiod logs it whole).
const MAX_NACK_BYTES: usize = 8 * 1024;

/// The two subscribed types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// `istio.workload.Address`.
    Address,
    /// `istio.security.Authorization`.
    Authorization,
}

impl Kind {
    pub(crate) const ALL: [Kind; 2] = [Kind::Address, Kind::Authorization];

    pub(crate) fn url(self) -> &'static str {
        match self {
            Kind::Address => ADDRESS_TYPE,
            Kind::Authorization => AUTHORIZATION_TYPE,
        }
    }

    fn from_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.url() == url)
    }
}

#[derive(Debug)]
struct Entry<T> {
    /// The version received; `None` for a fail-safe stand-in of a rejected resource.
    version: Option<String>,
    value: Arc<T>,
}

impl<T> Clone for Entry<T> {
    fn clone(&self) -> Self {
        Entry {
            version: self.version.clone(),
            value: self.value.clone(),
        }
    }
}

/// One rejected resource.
#[derive(Debug, PartialEq)]
pub(crate) struct Rejected {
    pub(crate) name: String,
    pub(crate) reason: ResourceError,
}

/// What applying a response did.
#[derive(Debug)]
pub(crate) struct Applied {
    pub(crate) kind: Kind,
    /// The new state (every held resource of both types).
    pub(crate) state: State,
    /// Resources skipped; empty means ACK.
    pub(crate) rejected: Vec<Rejected>,
    /// Resources added or replaced, and removed.
    pub(crate) updated: usize,
    pub(crate) removed: usize,
    /// Rejected policies now enforced through a fail-safe stand-in.
    pub(crate) stand_ins: usize,
}

/// The held resources.
#[derive(Debug)]
pub(crate) struct Cache {
    addresses: HashMap<String, Entry<Address>>,
    policies: HashMap<String, Entry<Policy>>,
    /// `policies` indexed; rebuilt only when an Authorization response changes them.
    policy_set: Arc<PolicySet>,
    max_resources: usize,
}

impl Cache {
    pub(crate) fn new(max_resources: usize) -> Cache {
        Cache {
            addresses: HashMap::new(),
            policies: HashMap::new(),
            policy_set: Arc::default(),
            max_resources,
        }
    }

    /// Name → version of what is held of `kind` (`initial_resource_versions`).
    pub(crate) fn versions(&self, kind: Kind) -> HashMap<String, String> {
        fn of<T>(m: &HashMap<String, Entry<T>>) -> HashMap<String, String> {
            m.iter()
                .filter_map(|(k, e)| Some((k.clone(), e.version.clone()?)))
                .collect()
        }
        match kind {
            Kind::Address => of(&self.addresses),
            Kind::Authorization => of(&self.policies),
        }
    }

    /// Applies `resp`: updates first, then removals (ztunnel's order). Bad resources are skipped and
    /// reported; if the result is not a consistent state, nothing changes.
    pub(crate) fn apply(&mut self, resp: DeltaDiscoveryResponse) -> Result<Applied, ResponseError> {
        let kind = Kind::from_url(&resp.type_url).ok_or_else(|| ResponseError::UnknownType {
            type_url: resp.type_url.clone(),
        })?;
        let held = self.addresses.len() + self.policies.len();
        let mut budget = self.max_resources.saturating_sub(held);
        let max = self.max_resources;
        let mut rejected = Vec::new();
        let updated;
        let stand_ins;
        let removed;
        match kind {
            Kind::Address => {
                let mut next = self.addresses.clone();
                Counts { updated, stand_ins } = update(
                    &mut next,
                    resp.resources,
                    kind,
                    &mut budget,
                    max,
                    &mut rejected,
                    |name, msg: workload::Address| convert::address(name, msg),
                    |_, _| None,
                );
                removed = remove(&mut next, &resp.removed_resources);
                let state = build(&next, self.policy_set.clone())?;
                self.addresses = next;
                Ok(Applied {
                    kind,
                    state,
                    rejected,
                    updated,
                    removed,
                    stand_ins,
                })
            }
            Kind::Authorization => {
                let mut next = self.policies.clone();
                Counts { updated, stand_ins } = update(
                    &mut next,
                    resp.resources,
                    kind,
                    &mut budget,
                    max,
                    &mut rejected,
                    |name, msg: security::Authorization| convert::policy(name, msg),
                    |name, msg| Some(convert::fail_safe_policy(name, msg)),
                );
                removed = remove(&mut next, &resp.removed_resources);
                let set = Arc::new(PolicySet::new(
                    next.values().map(|e| (*e.value).clone()).collect(),
                )?);
                let state = build(&self.addresses, set.clone())?;
                self.policies = next;
                self.policy_set = set;
                Ok(Applied {
                    kind,
                    state,
                    rejected,
                    updated,
                    removed,
                    stand_ins,
                })
            }
        }
    }
}

/// What [`update`] inserted.
struct Counts {
    /// Good versions.
    updated: usize,
    /// Fail-safe stand-ins of rejected resources.
    stand_ins: usize,
}

/// Decodes, converts and inserts each resource into `map`. A rejected one keeps its held good version;
/// without one, `stand_in` (given the name and the body, if it decodes) says what to hold instead.
#[allow(clippy::too_many_arguments)] // One call per type; a struct for these would only be unpacked again.
fn update<T, M: Message + Default>(
    map: &mut HashMap<String, Entry<T>>,
    resources: Vec<Resource>,
    kind: Kind,
    budget: &mut usize,
    limit: usize,
    rejected: &mut Vec<Rejected>,
    convert: impl Fn(&str, M) -> Result<T, super::ConvertError>,
    stand_in: impl Fn(&str, Option<M>) -> Option<T>,
) -> Counts {
    let mut counts = Counts {
        updated: 0,
        stand_ins: 0,
    };
    // A name not held yet takes one unit of the budget.
    let mut admit = |map: &HashMap<String, Entry<T>>, name: &str| {
        if map.contains_key(name) {
            return Ok(());
        }
        if *budget == 0 {
            return Err(ResourceError::TooMany { limit });
        }
        *budget -= 1;
        Ok(())
    };
    for res in resources {
        let result = decode::<M>(&res, kind)
            .and_then(|msg| Ok(convert(&res.name, msg)?))
            .and_then(|value| admit(map, &res.name).map(|()| value));
        let reason = match result {
            Ok(value) => {
                counts.updated += 1;
                map.insert(
                    res.name,
                    Entry {
                        version: Some(res.version),
                        value: Arc::new(value),
                    },
                );
                continue;
            }
            Err(reason) => reason,
        };
        let keeps_good = map.get(&res.name).is_some_and(|e| e.version.is_some());
        if !keeps_good && !matches!(reason, ResourceError::TooMany { .. }) {
            if let Some(value) = stand_in(&res.name, decode::<M>(&res, kind).ok()) {
                if admit(map, &res.name).is_ok() {
                    warn!(
                        name = %res.name,
                        type_url = kind.url(),
                        reason = %reason,
                        "xDS resource rejected; enforcing a fail-safe stand-in until a valid version arrives"
                    );
                    counts.stand_ins += 1;
                    map.insert(
                        res.name.clone(),
                        Entry {
                            version: None,
                            value: Arc::new(value),
                        },
                    );
                }
            }
        }
        rejected.push(Rejected {
            name: res.name,
            reason,
        });
    }
    counts
}

/// The body of `res`, decoded as the response's type.
fn decode<M: Message + Default>(res: &Resource, kind: Kind) -> Result<M, ResourceError> {
    let any = res.resource.as_ref().ok_or(ResourceError::MissingBody)?;
    if any.type_url != kind.url() {
        return Err(ResourceError::WrongType {
            expected: kind.url(),
            got: any.type_url.clone(),
        });
    }
    Ok(M::decode(any.value.as_slice())?)
}

fn remove<T>(map: &mut HashMap<String, Entry<T>>, names: &[String]) -> usize {
    names.iter().filter(|n| map.remove(*n).is_some()).count()
}

fn build(
    addresses: &HashMap<String, Entry<Address>>,
    policies: Arc<PolicySet>,
) -> Result<State, ResponseError> {
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    for e in addresses.values() {
        match &*e.value {
            Address::Workload(w) => workloads.push(w.clone()),
            Address::Service(s) => services.push(s.clone()),
        }
    }
    Ok(State::with_policies(workloads, services, policies)?)
}

/// The NACK message: `"<name>: <reason>; ..."`, bounded.
pub(crate) fn nack_detail(rejected: &[Rejected]) -> String {
    let mut out = String::new();
    for (i, r) in rejected.iter().take(MAX_NACK_ENTRIES).enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{}: {}", r.name, r.reason);
    }
    if rejected.len() > MAX_NACK_ENTRIES {
        let _ = write!(out, "; and {} more", rejected.len() - MAX_NACK_ENTRIES);
    }
    truncate(out)
}

/// Cuts `s` to [`MAX_NACK_BYTES`] at a character boundary.
pub(crate) fn truncate(mut s: String) -> String {
    if s.len() > MAX_NACK_BYTES {
        let mut end = MAX_NACK_BYTES - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}
