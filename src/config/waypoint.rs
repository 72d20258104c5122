//! Typed configuration of `meshnode waypoint`, built once at start-up and passed down.
//!
//! Input: the same environment as the node proxy (ztunnel's names, parsed by [`Config`]: `XDS_ADDRESS`,
//! `CA_ADDRESS`, `XDS_ROOT_CA`, `CA_ROOT_CA`, `AUTH_TOKEN`, `POD_NAME`, `POD_NAMESPACE`, `SERVICE_ACCOUNT`,
//! `INSTANCE_IP`, `ISTIO_META_*`, pool, HTTP/2 and keepalive settings) plus the few an Envoy waypoint pod is
//! given by Istio's waypoint template (`TRUST_DOMAIN`, `ISTIO_META_WORKLOAD_NAME`) and meshnode's own bounds.
//! Output: one [`WaypointConfig`]; a bad value is refused with the variable's name.
//!
//! The waypoint's name (the Gateway it serves, `<namespace>/<name>` being its xDS resource name) is
//! `WAYPOINT_NAME`, else `ISTIO_META_WORKLOAD_NAME` (Istio's waypoint template sets it to the Deployment's
//! name, which for a waypoint is the Gateway's), else `waypoint` (`istioctl waypoint apply`'s default).
//! Its identity is `spiffe://<TRUST_DOMAIN>/ns/<POD_NAMESPACE>/sa/<SERVICE_ACCOUNT>`; `SERVICE_ACCOUNT`
//! defaults to the waypoint's name, the account Istio creates for a waypoint.

use std::time::Duration;

use super::{parse_default, parse_duration, Config, Error, LocalConfigSource, Source};
use crate::identity::Identity;

crate::config::vars::declare! { WAYPOINT_VARS:
/// The trust domain of the waypoint's identity (Istio's waypoint template sets it).
TRUST_DOMAIN = "cluster.local";
/// The waypoint Gateway's name.
WAYPOINT_NAME = "ISTIO_META_WORKLOAD_NAME, else waypoint";
/// Istio's name for the pod's Deployment (the Gateway's name for a waypoint); used when `WAYPOINT_NAME` is unset.
ISTIO_META_WORKLOAD_NAME = "";
/// meshnode's own: time allowed for a request's headers once its first byte has arrived (and for the first
/// bytes of a stream whose protocol must be sniffed).
MESHNODE_WAYPOINT_HEADER_TIMEOUT = "10s";
/// meshnode's own: largest request head accepted (request line and headers), in bytes.
MESHNODE_WAYPOINT_MAX_REQUEST_HEADERS = "65536";
/// meshnode's own: largest request body kept so that the request can be retried.
MESHNODE_WAYPOINT_RETRY_BUFFER = "65536";
}

/// The default waypoint name (`istioctl waypoint apply`'s).
pub const DEFAULT_WAYPOINT_NAME: &str = "waypoint";
/// The default trust domain (Istio's).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The waypoint's listener ports (Istio's: HBONE 15008, stats 15020, readiness 15021).
#[derive(Debug, Clone, Copy)]
pub struct WaypointPorts {
    /// HBONE (mTLS + HTTP/2 CONNECT).
    pub hbone: u16,
    /// `GET /metrics`.
    pub metrics: u16,
    /// `GET /healthz/ready`.
    pub readiness: u16,
}

/// Everything the waypoint role needs, parsed and validated.
#[derive(Debug, Clone)]
pub struct WaypointConfig {
    /// The settings shared with the node proxy, read from the same variables: control plane, CA, tokens,
    /// HBONE pool and HTTP/2 settings, keepalive, handshake and idle timeouts, connection bounds.
    pub base: Config,
    /// The Gateway's namespace (`POD_NAMESPACE`).
    pub namespace: String,
    /// The Gateway's name.
    pub name: String,
    /// The service account the waypoint runs as.
    pub service_account: String,
    /// The trust domain of its identity.
    pub trust_domain: String,
    /// Listener ports.
    pub ports: WaypointPorts,
    /// Request headers must be complete this long after their first byte, or the client gets 408 (Envoy's
    /// `request_headers_timeout`). 10 s: as long as the handshake allows a peer.
    pub header_read_timeout: Duration,
    /// Request line plus headers, at most (Envoy's `max_request_headers_kb` is 60 KiB; ztunnel's and the HBONE
    /// server's header limit is 64 KiB, so a head the tunnel carries fits); more gets 431.
    pub max_request_headers: usize,
    /// Request bodies up to this size are kept for retries (Envoy's per-request retry buffer is of this
    /// order); a longer body is streamed and its request is not retried.
    pub retry_buffer: usize,
}

impl WaypointConfig {
    /// Reads the configuration from `src`.
    pub fn from_source(src: &dyn Source) -> Result<WaypointConfig, Error> {
        let base = Config::from_source(src)?;
        if base.local_config != LocalConfigSource::None {
            return Err(Error::Conflict(
                "LOCAL_XDS_PATH/LOCAL_XDS are the node proxy's local config; the waypoint takes its configuration from XDS_ADDRESS",
            ));
        }
        let namespace = base.proxy_meta.pod_namespace.clone();
        if namespace.is_empty() {
            return Err(Error::Missing {
                name: super::POD_NAMESPACE,
                reason: "the waypoint serves the Gateway of its own namespace",
            });
        }
        let name = [WAYPOINT_NAME, ISTIO_META_WORKLOAD_NAME]
            .into_iter()
            .find_map(|k| src.get(k).filter(|v| !v.trim().is_empty()))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| DEFAULT_WAYPOINT_NAME.to_string());
        let service_account = match base.proxy_meta.service_account.trim() {
            "" => name.clone(),
            sa => sa.to_string(),
        };
        let trust_domain = src
            .get(TRUST_DOMAIN)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
        let cfg = WaypointConfig {
            base,
            namespace,
            name,
            service_account,
            trust_domain,
            ports: WaypointPorts {
                hbone: 15008,
                metrics: 15020,
                readiness: 15021,
            },
            header_read_timeout: parse_duration(
                src,
                MESHNODE_WAYPOINT_HEADER_TIMEOUT,
                Duration::from_secs(10),
            )?,
            max_request_headers: parse_default(
                src,
                MESHNODE_WAYPOINT_MAX_REQUEST_HEADERS,
                64 * 1024,
            )?,
            retry_buffer: parse_default(src, MESHNODE_WAYPOINT_RETRY_BUFFER, 64 * 1024)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.name.contains('/') {
            return Err(super::invalid(
                WAYPOINT_NAME,
                &self.name,
                "a Gateway name has no '/'",
            ));
        }
        if let Err(e) = Identity::new(&self.trust_domain, &self.namespace, &self.service_account) {
            return Err(super::invalid(
                TRUST_DOMAIN,
                &self.trust_domain,
                format!("the waypoint's identity would be invalid: {e}"),
            ));
        }
        if self.header_read_timeout.is_zero() {
            return Err(super::invalid(
                MESHNODE_WAYPOINT_HEADER_TIMEOUT,
                "0s",
                "must be longer than zero",
            ));
        }
        // hyper's HTTP/1 parser needs at least 8 KiB of buffer; less would also refuse ordinary requests.
        if self.max_request_headers < 8 * 1024 {
            return Err(super::invalid(
                MESHNODE_WAYPOINT_MAX_REQUEST_HEADERS,
                &self.max_request_headers.to_string(),
                "at least 8192",
            ));
        }
        Ok(())
    }

    /// The waypoint's own identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
            .expect("validated when the config was read")
    }

    /// The xDS name of its configuration: `<namespace>/<name>`.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn cfg(pairs: &[(&'static str, &'static str)]) -> Result<WaypointConfig, Error> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        WaypointConfig::from_source(&map)
    }

    #[test]
    fn waypoint_help_names_every_variable_the_waypoint_reads_with_its_real_default() {
        crate::config::vars::testing::check(
            &[crate::config::PROXY_VARS, WAYPOINT_VARS],
            WAYPOINT_VARS,
            &[&[("POD_NAMESPACE", "bookinfo")]],
            |src| format!("{:?}", WaypointConfig::from_source(src)),
        );
    }

    #[test]
    fn waypoint_reads_istio_waypoint_variables_with_istioctl_defaults() {
        let c = cfg(&[("POD_NAMESPACE", "bookinfo"), ("XDS_ADDRESS", "")]).unwrap();
        assert_eq!(c.name, "waypoint");
        assert_eq!(c.resource_name(), "bookinfo/waypoint");
        assert_eq!(
            c.identity().to_string(),
            "spiffe://cluster.local/ns/bookinfo/sa/waypoint"
        );
        assert_eq!(c.ports.hbone, 15008);
        assert_eq!(c.max_request_headers, 64 * 1024);

        let c = cfg(&[
            ("POD_NAMESPACE", "bookinfo"),
            ("ISTIO_META_WORKLOAD_NAME", "reviews-wp"),
            ("SERVICE_ACCOUNT", "wp-sa"),
            ("TRUST_DOMAIN", "example.org"),
        ])
        .unwrap();
        assert_eq!(c.resource_name(), "bookinfo/reviews-wp");
        assert_eq!(
            c.identity().to_string(),
            "spiffe://example.org/ns/bookinfo/sa/wp-sa"
        );
        let c = cfg(&[
            ("POD_NAMESPACE", "bookinfo"),
            ("ISTIO_META_WORKLOAD_NAME", "reviews-wp"),
            ("WAYPOINT_NAME", "explicit"),
        ])
        .unwrap();
        assert_eq!(c.name, "explicit");
    }

    #[test]
    fn waypoint_refuses_a_missing_namespace_and_bad_values_by_name() {
        let e = cfg(&[("XDS_ADDRESS", "")]).unwrap_err().to_string();
        assert!(e.contains("POD_NAMESPACE"), "{e}");
        let e = cfg(&[("POD_NAMESPACE", "a"), ("WAYPOINT_NAME", "x/y")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WAYPOINT_NAME"), "{e}");
        let e = cfg(&[
            ("POD_NAMESPACE", "a"),
            ("MESHNODE_WAYPOINT_MAX_REQUEST_HEADERS", "100"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("MESHNODE_WAYPOINT_MAX_REQUEST_HEADERS"), "{e}");
        let e = cfg(&[("POD_NAMESPACE", "a"), ("LOCAL_XDS", "workloads: []")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOCAL_XDS"), "{e}");
    }
}
