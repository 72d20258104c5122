//! Shared values for the state: strings, identities and port maps that thousands of workloads have in
//! common (namespace, service account, node, network, cluster id, …) are held once and pointed to.
//!
//! Input: the strings and port lists of converted workloads. Output: [`SharedStr`] (a shared `str` that
//! reads like a `&str`), interned [`Identity`] values and [`PortMap`]s, from one [`Interner`] per build
//! (the local config makes one per load; the xDS client keeps one for its life, so every push shares the
//! values the previous ones made, and [`Interner::prune`] drops those no workload uses any more).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use arcstr::ArcStr;

use crate::identity::{spiffe::ParseError, Identity};

/// An immutable string shared by reference count: one thin pointer (8 bytes; the length lives with the
/// text), cloned by a count, compared, hashed and printed as the `str` it holds.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SharedStr(ArcStr);

impl SharedStr {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SharedStr {
    fn default() -> SharedStr {
        SharedStr(ArcStr::new())
    }
}

impl Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for SharedStr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> SharedStr {
        SharedStr(ArcStr::from(s))
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> SharedStr {
        SharedStr(ArcStr::from(s))
    }
}

impl From<&String> for SharedStr {
    fn from(s: &String) -> SharedStr {
        SharedStr(ArcStr::from(s.as_str()))
    }
}

impl From<SharedStr> for String {
    fn from(s: SharedStr) -> String {
        s.0.to_string()
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, other: &SharedStr) -> bool {
        *self == *other.0
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, other: &SharedStr) -> bool {
        **self == *other.0
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, other: &SharedStr) -> bool {
        **self == *other.0
    }
}

/// Service port → target port, sorted by service port and shared between every workload (and endpoint)
/// with the same map.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct PortMap(Arc<[(u16, u16)]>);

impl PortMap {
    /// The map of `pairs`; a repeated service port keeps its last target, as a map insert would.
    pub fn new(pairs: impl IntoIterator<Item = (u16, u16)>) -> PortMap {
        let mut v: Vec<(u16, u16)> = Vec::new();
        for (s, t) in pairs {
            match v.iter_mut().find(|(k, _)| *k == s) {
                Some(e) => e.1 = t,
                None => v.push((s, t)),
            }
        }
        v.sort_unstable();
        PortMap(v.into())
    }

    /// The target of service port `port`.
    pub fn get(&self, port: &u16) -> Option<&u16> {
        self.0
            .binary_search_by_key(port, |(s, _)| *s)
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Whether `port` is mapped.
    pub fn contains_key(&self, port: &u16) -> bool {
        self.get(port).is_some()
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No ports.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (service port, target port), by service port.
    pub fn iter(&self) -> impl Iterator<Item = (&u16, &u16)> {
        self.0.iter().map(|(s, t)| (s, t))
    }
}

impl fmt::Debug for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(u16, u16)> for PortMap {
    fn from_iter<I: IntoIterator<Item = (u16, u16)>>(iter: I) -> PortMap {
        PortMap::new(iter)
    }
}

impl From<HashMap<u16, u16>> for PortMap {
    fn from(m: HashMap<u16, u16>) -> PortMap {
        PortMap::new(m)
    }
}

impl PartialEq<HashMap<u16, u16>> for PortMap {
    fn eq(&self, other: &HashMap<u16, u16>) -> bool {
        self.len() == other.len() && self.iter().all(|(s, t)| other.get(s) == Some(t))
    }
}

/// The services a workload backs: `namespace/hostname` → its port map. Few per workload, so a slice
/// searched in order; shared (and interned) between the workloads that back the same services with the
/// same ports, as the pods of one deployment do.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ServicePorts(Arc<[(SharedStr, PortMap)]>);

impl ServicePorts {
    /// The port map of service `key` (`namespace/hostname`).
    pub fn get(&self, key: &str) -> Option<&PortMap> {
        self.0.iter().find(|(k, _)| **k == *key).map(|(_, p)| p)
    }

    /// Whether the workload backs service `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Backs no service.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (service key, port map) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&SharedStr, &PortMap)> {
        self.0.iter().map(|(k, p)| (k, p))
    }

    /// The service keys.
    pub fn keys(&self) -> impl Iterator<Item = &SharedStr> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl<'a> IntoIterator for &'a ServicePorts {
    type Item = (&'a SharedStr, &'a PortMap);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (SharedStr, PortMap)>,
        fn(&'a (SharedStr, PortMap)) -> (&'a SharedStr, &'a PortMap),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, p)| (k, p))
    }
}

impl std::ops::Index<&str> for ServicePorts {
    type Output = PortMap;
    fn index(&self, key: &str) -> &PortMap {
        self.get(key)
            .unwrap_or_else(|| panic!("workload backs no service {key:?}"))
    }
}

impl fmt::Debug for ServicePorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(SharedStr, PortMap)> for ServicePorts {
    /// A repeated key keeps its last map, as a map insert would.
    fn from_iter<I: IntoIterator<Item = (SharedStr, PortMap)>>(iter: I) -> ServicePorts {
        ServicePorts(last_per_key(iter).into())
    }
}

/// The pairs, a repeated key keeping its last map.
fn last_per_key(iter: impl IntoIterator<Item = (SharedStr, PortMap)>) -> Vec<(SharedStr, PortMap)> {
    let mut v: Vec<(SharedStr, PortMap)> = Vec::new();
    for (k, p) in iter {
        match v.iter_mut().find(|(old, _)| *old == k) {
            Some(e) => e.1 = p,
            None => v.push((k, p)),
        }
    }
    v
}

/// One set of shared values. Not thread-safe by itself: one owner builds with it.
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<ArcStr>,
    identities: HashMap<(SharedStr, SharedStr, SharedStr), Identity>,
    ports: HashSet<PortMap>,
    service_ports: HashSet<ServicePorts>,
    /// Size after the last prune (or start): [`Interner::prune`] does work only once this doubled.
    pruned_at: usize,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn str(&mut self, s: &str) -> SharedStr {
        if let Some(a) = self.strings.get(s) {
            return SharedStr(a.clone());
        }
        let a = ArcStr::from(s);
        self.strings.insert(a.clone());
        SharedStr(a)
    }

    /// The shared copy of `s` (an owned string, as converters have them).
    pub fn string(&mut self, s: String) -> SharedStr {
        self.str(&s)
    }

    /// The identity `spiffe://<td>/ns/<ns>/sa/<sa>`, one value per distinct triple.
    pub fn identity(
        &mut self,
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, ParseError> {
        let key = (
            self.str(trust_domain),
            self.str(namespace),
            self.str(service_account),
        );
        if let Some(id) = self.identities.get(&key) {
            return Ok(id.clone());
        }
        let id = Identity::new(trust_domain, namespace, service_account)?;
        self.identities.insert(key, id.clone());
        Ok(id)
    }

    /// The shared copy of a port map.
    pub fn ports(&mut self, pairs: impl IntoIterator<Item = (u16, u16)>) -> PortMap {
        let map = PortMap::new(pairs);
        if let Some(m) = self.ports.get(&map) {
            return m.clone();
        }
        self.ports.insert(map.clone());
        map
    }

    /// The shared copy of a workload's service list (in key order, so that lists given in any order
    /// share: xDS sends them as a map).
    pub fn service_ports(
        &mut self,
        list: impl IntoIterator<Item = (SharedStr, PortMap)>,
    ) -> ServicePorts {
        let mut v = last_per_key(list);
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let sp = ServicePorts(v.into());
        if let Some(old) = self.service_ports.get(&sp) {
            return old.clone();
        }
        self.service_ports.insert(sp.clone());
        sp
    }

    fn len(&self) -> usize {
        self.strings.len() + self.identities.len() + self.ports.len() + self.service_ports.len()
    }

    /// Forgets values nobody but the interner holds, once it has doubled since the last time (so a
    /// long-lived interner stays proportional to what is in use, at amortised constant cost).
    pub fn prune(&mut self) {
        if self.len() < 2 * self.pruned_at.max(1024) {
            return;
        }
        // Identities and service lists first: they hold strings and port maps.
        self.service_ports.retain(|sp| Arc::strong_count(&sp.0) > 1);
        self.identities
            .retain(|_, id| Identity::strong_count(id) > 1);
        self.ports.retain(|p| Arc::strong_count(&p.0) > 1);
        // (A literal, such as the empty string, has no count and costs nothing to keep.)
        self.strings
            .retain(|s| ArcStr::strong_count(s).is_none_or(|n| n > 1));
        self.pruned_at = self.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_are_one_value_and_unused_ones_are_forgotten() {
        let mut i = Interner::default();
        let a = i.str("default");
        let b = i.string("default".to_string());
        assert!(ArcStr::ptr_eq(&a.0, &b.0));
        let p = i.ports([(80, 8080), (443, 8443)]);
        let q = i.ports([(443, 8443), (80, 8080)]);
        assert!(Arc::ptr_eq(&p.0, &q.0));
        assert_eq!(p.get(&443), Some(&8443));
        assert_eq!(p.get(&8080), None);
        let id = i.identity("cluster.local", "default", "sa").unwrap();
        assert_eq!(id, i.identity("cluster.local", "default", "sa").unwrap());
        assert_eq!(Identity::strong_count(&id), 2);
        // Two workloads backing the same services, listed in another order: one shared list.
        let (r, d) = (i.str("default/reviews"), i.str("default/details"));
        let s = i.service_ports([(r.clone(), p.clone()), (d.clone(), q.clone())]);
        let t = i.service_ports([(d.clone(), q), (r.clone(), p.clone())]);
        assert!(Arc::ptr_eq(&s.0, &t.0));
        assert_eq!(s.get("default/reviews"), Some(&p));
        drop((s, t, r, d));
        // Many values nobody holds any more: a prune keeps only those still in use.
        for n in 0..5000 {
            i.str(&format!("gone-{n}"));
        }
        i.prune();
        assert!(i.len() < 10, "{}", i.len());
        assert!(i.service_ports.is_empty());
        assert!(ArcStr::ptr_eq(&i.str("default").0, &a.0));
        assert_eq!(i.identity("cluster.local", "default", "sa").unwrap(), id);
        assert!(Arc::ptr_eq(&i.ports([(80, 8080), (443, 8443)]).0, &p.0));
    }

    #[test]
    fn service_ports_read_like_the_map_they_replace() {
        let sp: ServicePorts = [
            (SharedStr::from("ns/a"), PortMap::new([(80, 8080)])),
            (SharedStr::from("ns/b"), PortMap::new([(81, 0)])),
            (SharedStr::from("ns/a"), PortMap::new([(82, 9090)])),
        ]
        .into_iter()
        .collect();
        assert_eq!(sp.len(), 2);
        assert_eq!(sp["ns/a"].get(&82), Some(&9090));
        assert_eq!(sp["ns/a"].get(&80), None);
        assert!(sp.contains_key("ns/b") && !sp.contains_key("ns/c"));
        assert_eq!(PortMap::new([(1, 2), (1, 3)]).get(&1), Some(&3));
    }
}
