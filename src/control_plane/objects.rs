//! The Kubernetes objects of the mesh file's `istio:` list, in the shapes users write them for kubectl:
//! Istio's `AuthorizationPolicy` and `PeerAuthentication` ([`security`]), `VirtualService`,
//! `DestinationRule`, `ServiceEntry` and `WorkloadEntry` ([`networking`]), and Gateway API's `Gateway` and
//! `HTTPRoute` ([`gateway`]).
//!
//! Input: YAML (or JSON) values. Output: [`IstioObject`]s, or serde's error naming the path and line
//! (`istio[2].spec.rules[0].from[0].source: unknown field \`principalz\``). An object is read by its
//! `kind`, and its `spec` with that kind's fields only, unknown fields refused. Fields Istio or Gateway API
//! define but meshnode does not implement are read as [`Unsupported`] (so the message is not "unknown
//! field") and refused by the translation, which names them. Shapes only: what the objects mean is in
//! `istio.rs` (security), `waypoints.rs` (ambient L7), `topology.rs` (east-west Gateways) and
//! `service_entries.rs`; this module depends on nothing else of the control plane.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

pub mod gateway;
pub mod networking;
pub mod security;

/// Labels (or annotations) of an object; also service selectors.
pub type Labels = BTreeMap<String, String>;

/// One object of the `istio:` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioObject {
    /// e.g. `security.istio.io/v1`; checked against the kind by [`ObjectKind::check_api_version`].
    pub api_version: String,
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// The kind and its spec.
    pub spec: Spec,
}

impl IstioObject {
    /// What it is.
    pub fn kind(&self) -> ObjectKind {
        self.spec.kind()
    }
}

/// The kinds the `istio:` list holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum ObjectKind {
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
    /// `gateway.networking.k8s.io` Gateway (classes `istio-waypoint` and `istio-east-west`).
    Gateway,
    /// `gateway.networking.k8s.io` HTTPRoute.
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    /// `networking.istio.io` VirtualService.
    VirtualService,
    /// `networking.istio.io` DestinationRule.
    DestinationRule,
    /// `networking.istio.io` ServiceEntry.
    ServiceEntry,
    /// `networking.istio.io` WorkloadEntry.
    WorkloadEntry,
}

impl ObjectKind {
    /// The `apiVersion`s this kind is written in.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            ObjectKind::AuthorizationPolicy | ObjectKind::PeerAuthentication => {
                &["security.istio.io/v1", "security.istio.io/v1beta1"]
            }
            ObjectKind::Gateway | ObjectKind::HttpRoute => &[
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1beta1",
            ],
            ObjectKind::VirtualService
            | ObjectKind::DestinationRule
            | ObjectKind::ServiceEntry
            | ObjectKind::WorkloadEntry => &[
                "networking.istio.io/v1",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1alpha3",
            ],
        }
    }

    /// Whether `api_version` is one this kind is written in.
    pub fn check_api_version(self, api_version: &str) -> Result<(), String> {
        let versions = self.api_versions();
        if versions.contains(&api_version) {
            Ok(())
        } else {
            Err(format!(
                "{api_version:?} is not one of {versions:?} (the versions of {})",
                self.name()
            ))
        }
    }

    /// The kind as written in `kind:`.
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::AuthorizationPolicy => "AuthorizationPolicy",
            ObjectKind::PeerAuthentication => "PeerAuthentication",
            ObjectKind::Gateway => "Gateway",
            ObjectKind::HttpRoute => "HTTPRoute",
            ObjectKind::VirtualService => "VirtualService",
            ObjectKind::DestinationRule => "DestinationRule",
            ObjectKind::ServiceEntry => "ServiceEntry",
            ObjectKind::WorkloadEntry => "WorkloadEntry",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Kubernetes object metadata (the parts that matter here).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Object name.
    pub name: String,
    /// Object namespace (required: there is no kubectl context to default it).
    pub namespace: String,
    /// Labels (`istio.io/waypoint-for` on a waypoint Gateway).
    #[serde(default)]
    pub labels: Labels,
    /// Annotations (`istio.io/dry-run` on an AuthorizationPolicy).
    #[serde(default)]
    pub annotations: Labels,
}

/// An object's spec, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // One variant per kind, named after it.
pub enum Spec {
    AuthorizationPolicy(security::AuthorizationPolicySpec),
    PeerAuthentication(security::PeerAuthenticationSpec),
    Gateway(gateway::GatewaySpec),
    HttpRoute(gateway::HttpRouteSpec),
    VirtualService(networking::VirtualServiceSpec),
    DestinationRule(networking::DestinationRuleSpec),
    ServiceEntry(networking::ServiceEntrySpec),
    WorkloadEntry(networking::WorkloadEntrySpec),
}

impl Spec {
    /// The kind this spec belongs to.
    pub fn kind(&self) -> ObjectKind {
        match self {
            Spec::AuthorizationPolicy(_) => ObjectKind::AuthorizationPolicy,
            Spec::PeerAuthentication(_) => ObjectKind::PeerAuthentication,
            Spec::Gateway(_) => ObjectKind::Gateway,
            Spec::HttpRoute(_) => ObjectKind::HttpRoute,
            Spec::VirtualService(_) => ObjectKind::VirtualService,
            Spec::DestinationRule(_) => ObjectKind::DestinationRule,
            Spec::ServiceEntry(_) => ObjectKind::ServiceEntry,
            Spec::WorkloadEntry(_) => ObjectKind::WorkloadEntry,
        }
    }

    /// The spec of an object written without `spec:`.
    fn empty(kind: ObjectKind) -> Spec {
        match kind {
            ObjectKind::AuthorizationPolicy => Spec::AuthorizationPolicy(Default::default()),
            ObjectKind::PeerAuthentication => Spec::PeerAuthentication(Default::default()),
            ObjectKind::Gateway => Spec::Gateway(Default::default()),
            ObjectKind::HttpRoute => Spec::HttpRoute(Default::default()),
            ObjectKind::VirtualService => Spec::VirtualService(Default::default()),
            ObjectKind::DestinationRule => Spec::DestinationRule(Default::default()),
            ObjectKind::ServiceEntry => Spec::ServiceEntry(Default::default()),
            ObjectKind::WorkloadEntry => Spec::WorkloadEntry(Default::default()),
        }
    }
}

const OBJECT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];

impl<'de> Deserialize<'de> for IstioObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IstioObject, D::Error> {
        d.deserialize_map(ObjectVisitor)
    }
}

/// Reads `kind` first (kubectl writes it before `spec`, and `-o yaml` sorts keys), so the spec is read
/// straight from the document and errors keep their path; a `spec` written before `kind` is buffered.
struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = IstioObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object (apiVersion, kind, metadata, spec)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IstioObject, A::Error> {
        let mut api_version: Option<String> = None;
        let mut kind: Option<ObjectKind> = None;
        let mut metadata: Option<ObjectMeta> = None;
        let mut spec: Option<Spec> = None;
        let mut early_spec: Option<serde_json::Value> = None;
        while let Some(key) = map.next_key::<String>()? {
            let seen = match key.as_str() {
                "apiVersion" => api_version.replace(map.next_value()?).is_some(),
                "kind" => kind.replace(map.next_value()?).is_some(),
                "metadata" => metadata.replace(map.next_value()?).is_some(),
                "spec" => match kind {
                    Some(k) => spec.replace(map.next_value_seed(SpecSeed(k))?).is_some(),
                    None => early_spec.replace(map.next_value()?).is_some(),
                },
                other => return Err(de::Error::unknown_field(other, OBJECT_FIELDS)),
            };
            if seen {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
        }
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        let spec = match (spec, early_spec) {
            (Some(spec), _) => spec,
            (None, Some(value)) => SpecSeed(kind)
                .deserialize(value)
                .map_err(|e| de::Error::custom(format_args!("spec: {e}")))?,
            (None, None) => Spec::empty(kind),
        };
        Ok(IstioObject {
            api_version: api_version.ok_or_else(|| de::Error::missing_field("apiVersion"))?,
            metadata: metadata.ok_or_else(|| de::Error::missing_field("metadata"))?,
            spec,
        })
    }
}

struct SpecSeed(ObjectKind);

impl<'de> DeserializeSeed<'de> for SpecSeed {
    type Value = Spec;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Spec, D::Error> {
        Ok(match self.0 {
            ObjectKind::AuthorizationPolicy => {
                Spec::AuthorizationPolicy(Deserialize::deserialize(d)?)
            }
            ObjectKind::PeerAuthentication => {
                Spec::PeerAuthentication(Deserialize::deserialize(d)?)
            }
            ObjectKind::Gateway => Spec::Gateway(Deserialize::deserialize(d)?),
            ObjectKind::HttpRoute => Spec::HttpRoute(Deserialize::deserialize(d)?),
            ObjectKind::VirtualService => Spec::VirtualService(Deserialize::deserialize(d)?),
            ObjectKind::DestinationRule => Spec::DestinationRule(Deserialize::deserialize(d)?),
            ObjectKind::ServiceEntry => Spec::ServiceEntry(Deserialize::deserialize(d)?),
            ObjectKind::WorkloadEntry => Spec::WorkloadEntry(Deserialize::deserialize(d)?),
        })
    }
}

/// A field Istio or Gateway API defines that meshnode does not implement. It is read (whatever its value)
/// so that the translation can refuse it by name, saying it is unsupported rather than unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unsupported;

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Unsupported, D::Error> {
        IgnoredAny::deserialize(d)?;
        Ok(Unsupported)
    }
}

/// The first of `fields` (name, present) that is present.
pub fn first_present(fields: &[(&'static str, bool)]) -> Option<&'static str> {
    fields.iter().find(|(_, present)| *present).map(|(n, _)| *n)
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
    /// The value as text.
    pub fn text(&self) -> String {
        match self {
            Scalar::Number(n) => n.to_string(),
            Scalar::Text(s) => s.clone(),
        }
    }
}

/// A duration as Istio and Gateway API write them: a sequence of decimal numbers with a unit each, as Go's
/// `time.ParseDuration` reads them (`10s`, `0.5s`, `1h30m`, `250ms`; units `h`, `m`, `s`, `ms`, `us`, `µs`,
/// `ns`). `0` alone is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like 10s, 0.5s, 1m30s or 250ms");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    // A year is far beyond any timeout or interval that makes sense here.
    if !(0.0..=365.0 * 24.0 * 3600.0).contains(&total) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_and_istio_write_them() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("0.5s"), Duration::from_millis(500));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("0"), Duration::ZERO);
        for bad in ["", "10", "s", "10 s", "1d", "-1s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_spec_written_before_its_kind_is_still_read() {
        let obj: IstioObject = serde_yaml::from_str(
            "spec: {action: DENY}\nkind: AuthorizationPolicy\napiVersion: security.istio.io/v1\nmetadata: {name: a, namespace: b}\n",
        )
        .unwrap();
        assert_eq!(obj.kind(), ObjectKind::AuthorizationPolicy);
        let err = serde_yaml::from_str::<IstioObject>(
            "spec: {bogus: 1}\nkind: AuthorizationPolicy\napiVersion: security.istio.io/v1\nmetadata: {name: a, namespace: b}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("spec: unknown field `bogus`"), "{err}");
    }
}
