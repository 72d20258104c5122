//! CNI results: parsing `prevResult` in any supported version and re-emitting it in the requested one.
//!
//! Input: the `prevResult` JSON of the stdin configuration (0.3.0, 0.3.1, 0.4.0, 1.0.0 or 1.1.0).
//! Output: [`CniResult`], which a chained plugin prints unchanged but converted to the configuration's
//! `cniVersion`: 0.3.x/0.4.0 `ips` entries carry `"version": "4"|"6"`, 1.x entries do not. Interfaces, routes
//! and dns are kept as the JSON objects they were (all keys); unknown top-level keys are dropped, as libcni does.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::error::Error;

/// CNI versions this plugin speaks, oldest first.
pub(crate) const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A supported CNI spec version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Version {
    /// 0.3.0
    V0_3_0,
    /// 0.3.1
    V0_3_1,
    /// 0.4.0: adds CHECK.
    V0_4_0,
    /// 1.0.0: drops `ips[].version`.
    V1_0_0,
    /// 1.1.0: adds GC and STATUS.
    V1_1_0,
}

impl Version {
    /// The newest version, used when the input names none (VERSION).
    pub(crate) const LATEST: Version = Version::V1_1_0;

    /// Parses a supported version string.
    pub(crate) fn parse(s: &str) -> Option<Version> {
        Some(match s {
            "0.3.0" => Version::V0_3_0,
            "0.3.1" => Version::V0_3_1,
            "0.4.0" => Version::V0_4_0,
            "1.0.0" => Version::V1_0_0,
            "1.1.0" => Version::V1_1_0,
            _ => return None,
        })
    }

    /// The version string.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Whether `ips` entries carry a `version` field.
    fn ips_carry_version(self) -> bool {
        self < Version::V1_0_0
    }
}

/// An address with its prefix length, as in `"10.0.0.5/24"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpCidr {
    /// The interface address (not the network address).
    pub(crate) addr: IpAddr,
    /// The prefix length.
    pub(crate) prefix: u8,
}

impl IpCidr {
    /// Parses `addr/prefix`.
    pub(crate) fn parse(s: &str) -> Option<IpCidr> {
        let (addr, prefix) = s.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(IpCidr { addr, prefix })
    }

    /// The raw bytes of the netmask (4 for IPv4, 16 for IPv6), as Go's `net.IPMask` holds them.
    pub(crate) fn mask_bytes(&self) -> Vec<u8> {
        let len = if self.addr.is_ipv4() { 4 } else { 16 };
        let mut left = u32::from(self.prefix);
        (0..len)
            .map(|_| {
                let bits = left.min(8);
                left -= bits;
                // `bits` is 0..=8: shifting a u16 keeps 8 within range.
                (0xff00u16 >> bits) as u8
            })
            .collect()
    }
}

impl std::fmt::Display for IpCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One entry of `ips`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IpConfig {
    /// `address`.
    pub(crate) address: IpCidr,
    /// `gateway`, when set.
    pub(crate) gateway: Option<IpAddr>,
    /// `interface`: an index into `interfaces`.
    pub(crate) interface: Option<u64>,
}

/// A CNI ADD result, version-independent.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CniResult {
    /// `interfaces`, each kept as its JSON object.
    pub(crate) interfaces: Vec<Value>,
    /// `ips`.
    pub(crate) ips: Vec<IpConfig>,
    /// `routes`, each kept as its JSON object (dst, gw, mtu, advmss, priority, table, scope…).
    pub(crate) routes: Vec<Value>,
    /// `dns`, kept as its JSON object.
    pub(crate) dns: Option<Map<String, Value>>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Decode {
        what: "prevResult",
        reason: reason.into(),
    }
}

impl CniResult {
    /// Parses a result in any supported version. The formats differ only in `ips[].version`, which is
    /// recomputed from the address on output, so one parser reads them all; an unsupported `cniVersion` of
    /// the result itself (e.g. 0.2.0 with its `ip4` object) is refused. Without one, the config's applies.
    pub(crate) fn parse(value: &Value) -> Result<CniResult, Error> {
        let obj = value
            .as_object()
            .ok_or_else(|| bad("prevResult is not a JSON object"))?;
        match obj.get("cniVersion") {
            None => {}
            Some(Value::String(v)) if Version::parse(v).is_none() => {
                return Err(Error::UnsupportedVersion {
                    what: "prevResult",
                    version: v.clone(),
                });
            }
            Some(Value::String(_)) => {}
            Some(other) => return Err(bad(format!("cniVersion is not a string: {other}"))),
        }
        Ok(CniResult {
            interfaces: objects(obj, "interfaces")?,
            ips: match obj.get("ips") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(ips)) => ips.iter().map(parse_ip).collect::<Result<_, _>>()?,
                Some(other) => return Err(bad(format!("ips is not a list: {other}"))),
            },
            routes: objects(obj, "routes")?,
            dns: match obj.get("dns") {
                None | Some(Value::Null) => None,
                Some(Value::Object(dns)) => Some(dns.clone()),
                Some(other) => return Err(bad(format!("dns is not an object: {other}"))),
            },
        })
    }

    /// The result in `version`'s format. Empty lists are left out and `dns` is always present, as Go's
    /// libcni prints results.
    pub(crate) fn to_json(&self, version: Version) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), version.as_str().into());
        if !self.interfaces.is_empty() {
            out.insert("interfaces".into(), Value::Array(self.interfaces.clone()));
        }
        if !self.ips.is_empty() {
            let ips = self.ips.iter().map(|ip| ip_json(ip, version)).collect();
            out.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            out.insert("routes".into(), Value::Array(self.routes.clone()));
        }
        out.insert(
            "dns".into(),
            Value::Object(self.dns.clone().unwrap_or_default()),
        );
        Value::Object(out)
    }
}

fn objects(obj: &Map<String, Value>, key: &str) -> Result<Vec<Value>, Error> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::Object(_) => Ok(item.clone()),
                other => Err(bad(format!("{key} entry is not an object: {other}"))),
            })
            .collect(),
        Some(other) => Err(bad(format!("{key} is not a list: {other}"))),
    }
}

fn parse_ip(value: &Value) -> Result<IpConfig, Error> {
    let obj = value
        .as_object()
        .ok_or_else(|| bad(format!("ips entry is not an object: {value}")))?;
    let address = obj
        .get("address")
        .and_then(Value::as_str)
        .and_then(IpCidr::parse)
        .ok_or_else(|| bad(format!("ips entry without a valid CIDR address: {value}")))?;
    let gateway = match obj.get("gateway") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(
            s.parse()
                .map_err(|_| bad(format!("ips entry with an invalid gateway: {value}")))?,
        ),
        Some(_) => return Err(bad(format!("ips gateway is not a string: {value}"))),
    };
    let interface = match obj.get("interface") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| bad(format!("ips interface is not an index: {value}")))?,
        ),
    };
    Ok(IpConfig {
        address,
        gateway,
        interface,
    })
}

fn ip_json(ip: &IpConfig, version: Version) -> Value {
    let mut out = Map::new();
    if version.ips_carry_version() {
        let family = if ip.address.addr.is_ipv4() { "4" } else { "6" };
        out.insert("version".into(), family.into());
    }
    if let Some(interface) = ip.interface {
        out.insert("interface".into(), interface.into());
    }
    out.insert("address".into(), ip.address.to_string().into());
    if let Some(gw) = ip.gateway {
        out.insert("gateway".into(), gw.to_string().into());
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn result_0_4_0() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/x"}],
            "ips": [
                {"version": "4", "interface": 0, "address": "10.1.2.3/24", "gateway": "10.1.2.1"},
                {"version": "6", "interface": 0, "address": "fd00::3/64"}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
        })
    }

    #[test]
    fn converting_0_4_0_to_1_0_0_drops_ip_versions_and_keeps_everything_else() {
        let parsed = CniResult::parse(&result_0_4_0()).expect("valid");
        let out = parsed.to_json(Version::V1_0_0);
        assert_eq!(
            out,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/x"}],
                "ips": [
                    {"interface": 0, "address": "10.1.2.3/24", "gateway": "10.1.2.1"},
                    {"interface": 0, "address": "fd00::3/64"}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
            })
        );
    }

    #[test]
    fn converting_1_0_0_back_to_0_4_0_restores_the_original() {
        let there = CniResult::parse(&result_0_4_0())
            .expect("valid")
            .to_json(Version::V1_0_0);
        let back = CniResult::parse(&there)
            .expect("valid")
            .to_json(Version::V0_4_0);
        assert_eq!(back, result_0_4_0());
    }

    #[test]
    fn converting_to_0_3_1_adds_the_family_of_each_address() {
        let v1 = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.5/16"}, {"address": "2001:db8::5/64"}]});
        let out = CniResult::parse(&v1)
            .expect("valid")
            .to_json(Version::V0_3_1);
        assert_eq!(out["ips"][0]["version"], "4");
        assert_eq!(out["ips"][1]["version"], "6");
        assert_eq!(out["cniVersion"], "0.3.1");
    }

    #[test]
    fn routes_keep_all_their_keys() {
        let route = json!({"dst": "10.0.0.0/8", "gw": "10.0.0.1", "mtu": 1400, "advmss": 1360,
                           "priority": 5, "table": 100, "scope": 253});
        let v1 = json!({"cniVersion": "1.1.0", "routes": [&route]});
        let out = CniResult::parse(&v1)
            .expect("valid")
            .to_json(Version::V0_4_0);
        assert_eq!(out["routes"][0], route);
    }

    #[test]
    fn an_empty_result_is_only_version_and_dns() {
        assert_eq!(
            CniResult::default().to_json(Version::V1_0_0),
            json!({"cniVersion": "1.0.0", "dns": {}})
        );
    }

    #[test]
    fn malformed_results_are_decode_errors() {
        for bad in [
            json!("not an object"),
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "gateway": "nope"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "interface": -1}]}),
            json!({"interfaces": "eth0"}),
            json!({"dns": []}),
        ] {
            let err = CniResult::parse(&bad).expect_err("malformed");
            assert_eq!(err.code(), crate::error::CODE_DECODE, "{bad}");
        }
    }

    #[test]
    fn a_result_in_an_unknown_version_is_incompatible() {
        let err = CniResult::parse(&json!({"cniVersion": "0.2.0", "ip4": {}}))
            .expect_err("0.2.0 is not supported");
        assert_eq!(err.code(), crate::error::CODE_INCOMPATIBLE_VERSION);
    }

    #[test]
    fn masks_are_the_raw_netmask_bytes() {
        let v4 = IpCidr::parse("10.0.0.5/20").expect("valid");
        assert_eq!(v4.mask_bytes(), vec![255, 255, 240, 0]);
        let v6 = IpCidr::parse("fd00::1/64").expect("valid");
        assert_eq!(v6.mask_bytes(), [vec![255u8; 8], vec![0u8; 8]].concat());
        assert_eq!(
            IpCidr::parse("10.0.0.5/0").expect("valid").mask_bytes(),
            vec![0; 4]
        );
    }
}
