//! The network configuration on stdin: the plugin's conflist entry as the runtime hands it over.
//!
//! Input: stdin bytes: `cniVersion`, `name`, `type`, optional `prevResult` (ADD/DEL/CHECK) or
//! `cni.dev/valid-attachments` (GC), plus istio-cni's keys (`cni_agent_run_dir`, `exclude_namespaces`,
//! `pod_namespace`, `ambient_enabled`, `plugin_log_level`; `enablement_selectors` and the rest are ignored).
//! Output: [`NetConf`], or the CNI error for malformed JSON (6), an unsupported version (1) or a missing or
//! mistyped key (7).

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::Error;
use crate::log::Level;
use crate::result::Version;

/// Where istio-cni's agent keeps its sockets when the config does not say (`cni_agent_run_dir`).
pub(crate) const DEFAULT_RUN_DIR: &str = "/var/run/istio-cni";

/// One `{containerID, ifname}` the runtime still knows about (GC).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub(crate) struct ValidAttachment {
    /// The container.
    #[serde(rename = "containerID")]
    pub(crate) container_id: String,
    /// Its interface.
    pub(crate) ifname: String,
}

/// The parsed configuration.
#[derive(Debug, Clone)]
pub(crate) struct NetConf {
    /// `cniVersion`: the version the result must be in.
    pub(crate) version: Version,
    /// `prevResult`, still raw: only ADD/CHECK/DEL decode it.
    pub(crate) prev_result: Option<Value>,
    /// `cni_agent_run_dir`.
    pub(crate) run_dir: PathBuf,
    /// `exclude_namespaces`: pods there are never enrolled.
    pub(crate) exclude_namespaces: Vec<String>,
    /// `pod_namespace`: the namespace of the agent's own pods.
    pub(crate) pod_namespace: Option<String>,
    /// `ambient_enabled`: an explicit `false` turns enrollment off (every pod passes through).
    pub(crate) ambient_enabled: Option<bool>,
    /// `plugin_log_level`.
    pub(crate) log_level: Level,
    /// `cni.dev/valid-attachments` (GC only).
    pub(crate) valid_attachments: Option<Vec<ValidAttachment>>,
}

/// The `cniVersion` of stdin, if it is a JSON object with one: used for VERSION and for the version of an
/// error reported before the whole config is validated.
pub(crate) fn peek_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<Peek>(stdin)
        .ok()
        .and_then(|p| p.cni_version)
}

impl NetConf {
    /// Parses and validates stdin.
    pub(crate) fn parse(stdin: &[u8]) -> Result<NetConf, Error> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| Error::Decode {
            what: "network configuration",
            reason: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(Error::Decode {
                what: "network configuration",
                reason: "the network configuration is not a JSON object".into(),
            });
        };
        let version_str: String = required(&map, "cniVersion")?;
        let version = Version::parse(&version_str).ok_or(Error::UnsupportedVersion {
            what: "network configuration",
            version: version_str,
        })?;
        // `name` and `type` must be there (the runtime always sets them) but nothing here depends on them.
        let _name: String = required(&map, "name")?;
        let _plugin_type: String = required(&map, "type")?;
        let log_level = optional::<String>(&map, "plugin_log_level")?
            .and_then(|l| Level::parse(&l))
            .unwrap_or(Level::DEFAULT);
        Ok(NetConf {
            version,
            prev_result: map.get("prevResult").filter(|v| !v.is_null()).cloned(),
            run_dir: optional::<PathBuf>(&map, "cni_agent_run_dir")?
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
            exclude_namespaces: optional(&map, "exclude_namespaces")?.unwrap_or_default(),
            pod_namespace: optional::<String>(&map, "pod_namespace")?.filter(|s| !s.is_empty()),
            ambient_enabled: optional(&map, "ambient_enabled")?,
            log_level,
            valid_attachments: optional(&map, "cni.dev/valid-attachments")?,
        })
    }
}

/// A key that must be present, non-null and (for strings) non-empty.
fn required<T: DeserializeOwned + IsEmpty>(
    map: &Map<String, Value>,
    key: &'static str,
) -> Result<T, Error> {
    match optional::<T>(map, key)? {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::MissingConfigKey { key }),
    }
}

/// A key that may be absent or null; present, it must have the right type.
fn optional<T: DeserializeOwned>(
    map: &Map<String, Value>,
    key: &'static str,
) -> Result<Option<T>, Error> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v)
            .map(Some)
            .map_err(|e| Error::InvalidConfigKey {
                key,
                reason: format!("{key}: {e}"),
            }),
    }
}

/// Whether a required value counts as missing.
trait IsEmpty {
    fn is_empty(&self) -> bool;
}

impl IsEmpty for String {
    fn is_empty(&self) -> bool {
        String::is_empty(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{CODE_DECODE, CODE_INCOMPATIBLE_VERSION, CODE_INVALID_CONFIG};

    #[test]
    fn istio_cni_entry_parses_with_defaults_for_what_is_absent() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"k8s-pod-network","type":"istio-cni",
                 "exclude_namespaces":["kube-system"],"ambient_enabled":true,"dns":{},"ipam":{},
                 "enablement_selectors":[{"podSelector":{"matchLabels":{"istio.io/dataplane-mode":"ambient"}}}],
                 "plugin_log_level":"debug","pod_namespace":"istio-system","something_new":42}"#,
        )
        .expect("valid");
        assert_eq!(conf.version, Version::V0_3_1);
        assert_eq!(conf.run_dir, PathBuf::from(DEFAULT_RUN_DIR));
        assert_eq!(conf.exclude_namespaces, vec!["kube-system".to_string()]);
        assert_eq!(conf.pod_namespace.as_deref(), Some("istio-system"));
        assert_eq!(conf.log_level, Level::Debug);
        assert!(conf.prev_result.is_none());
    }

    #[test]
    fn config_errors_carry_the_spec_codes() {
        let cases: &[(&[u8], u32)] = &[
            (b"{not json", CODE_DECODE),
            (b"[1,2]", CODE_DECODE),
            (br#"{"name":"n","type":"t"}"#, CODE_INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","type":"t"}"#, CODE_INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n"}"#, CODE_INVALID_CONFIG),
            (br#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#, CODE_INCOMPATIBLE_VERSION),
            (
                br#"{"cniVersion":"1.0.0","name":"n","type":"t","exclude_namespaces":"kube-system"}"#,
                CODE_INVALID_CONFIG,
            ),
        ];
        for (input, code) in cases {
            let err = NetConf::parse(input).expect_err("invalid");
            assert_eq!(err.code(), *code, "{}", String::from_utf8_lossy(input));
        }
    }
}
