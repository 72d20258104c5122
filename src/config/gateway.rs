//! The east-west gateway role's configuration (`meshnode gateway`), read from the environment as the
//! node proxy's is: the shared variables (control plane, CA, tokens, `NETWORK`, HTTP/2, timeouts, bounds)
//! plus its own below.
//!
//! Input: a [`Source`] of variables. Output: one [`GatewayConfig`]; a bad value is refused with the
//! variable's name.
//!
//! Its identity is `spiffe://<TRUST_DOMAIN>/ns/<POD_NAMESPACE>/sa/<SERVICE_ACCOUNT>` (`SERVICE_ACCOUNT`
//! defaults to `istio-eastwestgateway`, the account of Istio's east-west gateway), which is what clients
//! expect of the gateway workload the state names. `NETWORK` is required: the gateway forwards only to
//! endpoints on it. State comes from `XDS_ADDRESS`, or from ztunnel's local config (`LOCAL_XDS_PATH`)
//! when that is set and `XDS_ADDRESS` is empty.

use super::{Config, Error, Source};
use crate::identity::Identity;

crate::config::vars::declare! { GATEWAY_VARS:
/// The trust domain of the gateway's identity.
TRUST_DOMAIN = "cluster.local";
/// meshnode's own: the port the gateway terminates HBONE on (Istio's east-west listener: 15008).
MESHNODE_GATEWAY_PORT = "15008";
}

/// The service account of Istio's east-west gateway.
pub const DEFAULT_GATEWAY_SERVICE_ACCOUNT: &str = "istio-eastwestgateway";

/// The gateway's listener ports (HBONE as Istio's east-west listener; stats and readiness as every
/// Istio proxy's).
#[derive(Debug, Clone, Copy)]
pub struct GatewayPorts {
    /// HBONE (mTLS + HTTP/2 CONNECT).
    pub hbone: u16,
    /// `GET /metrics`.
    pub metrics: u16,
    /// `GET /healthz/ready`.
    pub readiness: u16,
}

/// Everything the gateway role needs, parsed and validated.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The settings shared with the node proxy (`NETWORK` is the network it serves).
    pub base: Config,
    /// Its namespace (`POD_NAMESPACE`).
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
    /// The trust domain of its identity.
    pub trust_domain: String,
    /// Listener ports.
    pub ports: GatewayPorts,
}

impl GatewayConfig {
    /// Reads the configuration from `src`.
    pub fn from_source(src: &dyn Source) -> Result<GatewayConfig, Error> {
        let base = Config::from_source(src)?;
        let namespace = base.proxy_meta.pod_namespace.trim().to_string();
        if namespace.is_empty() {
            return Err(Error::Missing {
                name: super::POD_NAMESPACE,
                reason: "the gateway's identity is in its namespace",
            });
        }
        if base.network.is_empty() {
            return Err(Error::Missing {
                name: super::NETWORK,
                reason: "a gateway forwards into the network it serves",
            });
        }
        let service_account = match base.proxy_meta.service_account.trim() {
            "" => DEFAULT_GATEWAY_SERVICE_ACCOUNT.to_string(),
            sa => sa.to_string(),
        };
        let trust_domain = src
            .get(TRUST_DOMAIN)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| super::waypoint::DEFAULT_TRUST_DOMAIN.to_string());
        let hbone = match src.get(MESHNODE_GATEWAY_PORT) {
            None => 15008,
            Some(v) => match v.trim().parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(super::invalid(MESHNODE_GATEWAY_PORT, &v, "a port, 1-65535")),
            },
        };
        if let Err(e) = Identity::new(&trust_domain, &namespace, &service_account) {
            return Err(super::invalid(
                TRUST_DOMAIN,
                &trust_domain,
                format!("the gateway's identity would be invalid: {e}"),
            ));
        }
        Ok(GatewayConfig {
            base,
            namespace,
            service_account,
            trust_domain,
            ports: GatewayPorts {
                hbone,
                metrics: 15020,
                readiness: 15021,
            },
        })
    }

    /// The gateway's own identity.
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
            .expect("validated when the config was read")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn cfg(pairs: &[(&'static str, &'static str)]) -> Result<GatewayConfig, Error> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        GatewayConfig::from_source(&map)
    }

    #[test]
    fn gateway_help_names_every_variable_the_gateway_reads_with_its_real_default() {
        crate::config::vars::testing::check(
            &[crate::config::PROXY_VARS, GATEWAY_VARS],
            GATEWAY_VARS,
            &[&[("POD_NAMESPACE", "istio-system"), ("NETWORK", "net2")]],
            |src| format!("{:?}", GatewayConfig::from_source(src)),
        );
    }

    #[test]
    fn gateway_identity_is_istios_east_west_account_unless_told_otherwise() {
        let c = cfg(&[("POD_NAMESPACE", "istio-system"), ("NETWORK", "net2")]).unwrap();
        assert_eq!(
            c.identity().to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway"
        );
        assert_eq!(c.ports.hbone, 15008);
        let c = cfg(&[
            ("POD_NAMESPACE", "gw"),
            ("NETWORK", "net2"),
            ("SERVICE_ACCOUNT", "ew"),
            ("TRUST_DOMAIN", "example.org"),
            ("MESHNODE_GATEWAY_PORT", "15009"),
        ])
        .unwrap();
        assert_eq!(c.identity().to_string(), "spiffe://example.org/ns/gw/sa/ew");
        assert_eq!(c.ports.hbone, 15009);
    }

    #[test]
    fn gateway_without_a_network_or_namespace_or_with_a_bad_port_is_refused_by_name() {
        let e = cfg(&[("POD_NAMESPACE", "istio-system")]).unwrap_err();
        assert!(e.to_string().contains("NETWORK"), "{e}");
        let e = cfg(&[("NETWORK", "net2")]).unwrap_err();
        assert!(e.to_string().contains("POD_NAMESPACE"), "{e}");
        let e = cfg(&[
            ("POD_NAMESPACE", "istio-system"),
            ("NETWORK", "net2"),
            ("MESHNODE_GATEWAY_PORT", "0"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("MESHNODE_GATEWAY_PORT"), "{e}");
    }
}
