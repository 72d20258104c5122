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
//! Waypoint resources (held only by a waypoint's client, and only under its own name) are checked by the
//! waypoint's own validation; a refused one keeps its previous good version, or is simply not held.
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
use super::{
    ResourceError, ResponseError, WaypointCheck, WaypointResources, ADDRESS_TYPE,
    AUTHORIZATION_TYPE, WAYPOINT_TYPE,
};
use crate::authz::{Policy, PolicySet};
use crate::proto::discovery::{DeltaDiscoveryResponse, Resource};
use crate::proto::{security, waypoint, workload};
use crate::state::{Interner, State};

/// At most this many rejections are spelled out in a NACK; the rest are counted.
const MAX_NACK_ENTRIES: usize = 32;
/// A NACK's `error_detail.message` is cut at this many bytes (istiod logs it whole).
const MAX_NACK_BYTES: usize = 8 * 1024;

/// The subscribed types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// `istio.workload.Address`.
    Address,
    /// `istio.security.Authorization`.
    Authorization,
    /// `meshnode.waypoint.Waypoint` (a waypoint's client only).
    Waypoint,
}

impl Kind {
    /// The node proxy's types.
    pub(crate) const PROXY: [Kind; 2] = [Kind::Address, Kind::Authorization];
    /// A waypoint's types.
    pub(crate) const WAYPOINT: [Kind; 3] = [Kind::Address, Kind::Authorization, Kind::Waypoint];

    pub(crate) fn url(self) -> &'static str {
        match self {
            Kind::Address => ADDRESS_TYPE,
            Kind::Authorization => AUTHORIZATION_TYPE,
            Kind::Waypoint => WAYPOINT_TYPE,
        }
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

/// A waypoint's own resource: its name and validation.
pub(crate) struct WaypointFilter {
    pub(crate) name: String,
    pub(crate) check: WaypointCheck,
}

impl std::fmt::Debug for WaypointFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaypointFilter")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The held resources.
#[derive(Debug)]
pub(crate) struct Cache {
    addresses: HashMap<String, Entry<Address>>,
    policies: HashMap<String, Entry<Policy>>,
    /// `policies` indexed; rebuilt only when an Authorization response changes them.
    policy_set: Arc<PolicySet>,
    /// What the held workloads share (strings, identities, port maps), kept across pushes.
    interner: Interner,
    /// A waypoint's own resource (at most one, under `waypoint_filter.name`).
    waypoints: HashMap<String, Entry<waypoint::Waypoint>>,
    waypoint_filter: Option<WaypointFilter>,
    max_resources: usize,
}

impl Cache {
    pub(crate) fn new(max_resources: usize) -> Cache {
        Cache {
            addresses: HashMap::new(),
            policies: HashMap::new(),
            policy_set: Arc::default(),
            interner: Interner::default(),
            waypoints: HashMap::new(),
            waypoint_filter: None,
            max_resources,
        }
    }

    /// Changes the resource bound (on an empty cache).
    pub(crate) fn set_max_resources(&mut self, max_resources: usize) {
        self.max_resources = max_resources;
    }

    /// A cache that also holds the `Waypoint` named in `filter`.
    pub(crate) fn for_waypoint(max_resources: usize, filter: WaypointFilter) -> Cache {
        Cache {
            waypoint_filter: Some(filter),
            ..Cache::new(max_resources)
        }
    }

    /// The types this cache holds.
    pub(crate) fn kinds(&self) -> &'static [Kind] {
        if self.waypoint_filter.is_some() {
            &Kind::WAYPOINT
        } else {
            &Kind::PROXY
        }
    }

    /// The resource names subscribed to for `kind`: the waypoint's own for [`Kind::Waypoint`], else none
    /// (wildcard).
    pub(crate) fn names(&self, kind: Kind) -> Vec<String> {
        match (kind, &self.waypoint_filter) {
            (Kind::Waypoint, Some(f)) => vec![f.name.clone()],
            _ => Vec::new(),
        }
    }

    fn kind_of(&self, url: &str) -> Option<Kind> {
        self.kinds().iter().copied().find(|k| k.url() == url)
    }

    /// Every workload and service held, and the waypoint's own resource.
    pub(crate) fn waypoint_resources(&self) -> WaypointResources {
        let mut out = WaypointResources::default();
        for e in self.addresses.values() {
            match &*e.value {
                Address::Workload(w) => out.workloads.push(w.clone()),
                Address::Service(s) => out.services.push(s.clone()),
            }
        }
        out.waypoint = self
            .waypoint_filter
            .as_ref()
            .and_then(|f| self.waypoints.get(&f.name))
            .map(|e| e.value.clone());
        out
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
            Kind::Waypoint => of(&self.waypoints),
        }
    }

    /// Applies `resp`: updates first, then removals (ztunnel's order). Bad resources are skipped and
    /// reported; if the result is not a consistent state, nothing changes.
    pub(crate) fn apply(&mut self, resp: DeltaDiscoveryResponse) -> Result<Applied, ResponseError> {
        let kind = self
            .kind_of(&resp.type_url)
            .ok_or_else(|| ResponseError::UnknownType {
                type_url: resp.type_url.clone(),
            })?;
        let held = self.addresses.len() + self.policies.len() + self.waypoints.len();
        let mut budget = self.max_resources.saturating_sub(held);
        let max = self.max_resources;
        let mut rejected = Vec::new();
        let updated;
        let stand_ins;
        let removed;
        match kind {
            Kind::Address => {
                let mut next = self.addresses.clone();
                let interner = std::cell::RefCell::new(&mut self.interner);
                Counts { updated, stand_ins } = update(
                    &mut next,
                    resp.resources,
                    kind,
                    &mut budget,
                    max,
                    &mut rejected,
                    |name, msg: workload::Address| {
                        Ok(convert::address_in(name, msg, &mut interner.borrow_mut())?)
                    },
                    |_, _| None,
                );
                removed = remove(&mut next, &resp.removed_resources);
                let state = build(&next, self.policy_set.clone())?;
                self.addresses = next;
                // Only now are replaced and removed workloads gone from every holder but the interner.
                self.interner.prune();
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
                    |name, msg: security::Authorization| Ok(convert::policy(name, msg)?),
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
            Kind::Waypoint => {
                let Some(filter) = &self.waypoint_filter else {
                    return Err(ResponseError::UnknownType {
                        type_url: resp.type_url,
                    });
                };
                // Only our own name is held; a server that ignores the subscription's names may send others.
                let (ours, others): (Vec<Resource>, Vec<Resource>) = resp
                    .resources
                    .into_iter()
                    .partition(|r| r.name == filter.name);
                if !others.is_empty() {
                    tracing::debug!(
                        ignored = others.len(),
                        "xDS sent waypoint resources of other waypoints; ignored"
                    );
                }
                let mut next = self.waypoints.clone();
                Counts { updated, stand_ins } = update(
                    &mut next,
                    ours,
                    kind,
                    &mut budget,
                    max,
                    &mut rejected,
                    |name, msg: waypoint::Waypoint| check_waypoint(filter, name, msg),
                    |_, _| None,
                );
                removed = remove(&mut next, &resp.removed_resources);
                let state = build(&self.addresses, self.policy_set.clone())?;
                self.waypoints = next;
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

/// A `Waypoint` is held when its content names it as it was sent and the waypoint accepts it.
fn check_waypoint(
    filter: &WaypointFilter,
    name: &str,
    msg: waypoint::Waypoint,
) -> Result<waypoint::Waypoint, ResourceError> {
    let key = format!("{}/{}", msg.namespace, msg.name);
    if key != name {
        return Err(ResourceError::Convert(
            convert::ConvertError::NameMismatch {
                what: "waypoint namespace/name",
                name: name.to_string(),
                key,
            },
        ));
    }
    (filter.check)(&msg).map_err(ResourceError::Waypoint)?;
    Ok(msg)
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
    convert: impl Fn(&str, M) -> Result<T, ResourceError>,
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
            .and_then(|msg| convert(&res.name, msg))
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
            Address::Service(s) => services.push((**s).clone()),
        }
    }
    Ok(State::with_shared(workloads, services, policies)?)
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
