//! gRPC connections to the control plane (istiod's xDS and CA, or `meshnode control-plane`), set up as
//! ztunnel sets them up.
//!
//! Input: a [`GrpcTarget`] (address, trust roots, alternative server name, extra headers) and the
//! [`AuthToken`] and cluster id from config. Output: a lazily connecting tonic [`Channel`] over TLS
//! (HTTP/2 only, ring provider) and [`Credentials`], which put `authorization: Bearer <token>` (the token
//! file re-read on every request, because projected tokens rotate), `clusterid` and the extra headers
//! on each request.

use std::time::Duration;

use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{AuthToken, GrpcTarget, RootCa};

/// Where Debian and most distributions keep the system's trusted roots (`RootCa::System`).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Connect timeout (ztunnel: 5 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive (ztunnel: ping every 30 s, 10 s to answer).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on the control-plane connection (ztunnel: 300 s).
const TCP_KEEPALIVE: Duration = Duration::from_secs(300);

/// Why a control-plane connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address is not a valid URI.
    #[error("control-plane address {address:?}: {reason}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The trust roots could not be read.
    #[error("reading trust roots {path}: {source}")]
    Roots {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS could not be configured.
    #[error("TLS for {address}: {reason}")]
    Tls {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The token file could not be read.
    #[error("reading the token {path}: {source}")]
    Token {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A header value is not valid ASCII metadata.
    #[error("header {name}: invalid value")]
    Header {
        /// The header.
        name: String,
    },
}

/// A channel to `target`; it connects on first use and reconnects by itself.
pub fn channel(target: &GrpcTarget) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(target.address.clone()).map_err(|e| Error::Address {
        address: target.address.clone(),
        reason: e.to_string(),
    })?;
    let host = endpoint
        .uri()
        .host()
        .ok_or_else(|| Error::Address {
            address: target.address.clone(),
            reason: "no host".into(),
        })?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let mut endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .tcp_nodelay(true);
    if endpoint.uri().scheme_str() == Some("https") {
        let pem = match &target.root {
            RootCa::Pem(text) => text.clone().into_bytes(),
            RootCa::File(path) => std::fs::read(path).map_err(|source| Error::Roots {
                path: path.display().to_string(),
                source,
            })?,
            RootCa::System => std::fs::read(SYSTEM_ROOTS).map_err(|source| Error::Roots {
                path: SYSTEM_ROOTS.into(),
                source,
            })?,
        };
        // The server's certificate must name `ALT_*_HOSTNAME` when set (e.g. `istiod.istio-system.svc` when
        // dialling an IP), else the host dialled.
        let name = target.alt_hostname.clone().unwrap_or(host);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(name);
        endpoint = endpoint.tls_config(tls).map_err(|e| Error::Tls {
            address: target.address.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(endpoint.connect_lazy())
}

/// What every request to the control plane carries.
#[derive(Debug, Clone)]
pub struct Credentials {
    token: AuthToken,
    cluster_id: String,
    headers: Vec<(String, String)>,
}

impl Credentials {
    /// Credentials from config values.
    pub fn new(
        token: AuthToken,
        cluster_id: String,
        headers: Vec<(String, String)>,
    ) -> Credentials {
        Credentials {
            token,
            cluster_id,
            headers,
        }
    }

    /// The bearer token now (a file is re-read every time).
    pub fn token(&self) -> Result<Option<String>, Error> {
        match &self.token {
            AuthToken::None => Ok(None),
            AuthToken::Literal(t) => Ok(Some(t.clone())),
            AuthToken::File(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|source| Error::Token {
                    path: path.display().to_string(),
                    source,
                }),
        }
    }

    /// Adds `authorization`, `clusterid` and the extra headers to `md`.
    pub fn apply(&self, md: &mut MetadataMap) -> Result<(), Error> {
        if let Some(token) = self.token()? {
            let v = AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                Error::Header {
                    name: "authorization".into(),
                }
            })?;
            md.insert("authorization", v);
        }
        let cluster =
            AsciiMetadataValue::try_from(self.cluster_id.as_str()).map_err(|_| Error::Header {
                name: "clusterid".into(),
            })?;
        md.insert("clusterid", cluster);
        for (name, value) in &self.headers {
            let bad = || Error::Header { name: name.clone() };
            let k = AsciiMetadataKey::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let v = AsciiMetadataValue::try_from(value.as_str()).map_err(|_| bad())?;
            md.insert(k, v);
        }
        Ok(())
    }

    /// A request carrying `msg` and these credentials.
    pub fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Error> {
        let mut req = tonic::Request::new(msg);
        self.apply(req.metadata_mut())?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_token_cluster_and_extra_headers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first\n").unwrap();
        let creds = Credentials::new(
            AuthToken::File(file.clone()),
            "east".into(),
            vec![("x-tenant".into(), "t1".into())],
        );
        let req = creds.request(()).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer first");
        assert_eq!(req.metadata().get("clusterid").unwrap(), "east");
        assert_eq!(req.metadata().get("x-tenant").unwrap(), "t1");
        // A rotated token is picked up on the next request.
        std::fs::write(&file, "second").unwrap();
        let req = creds.request(()).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer second"
        );
        std::fs::remove_file(&file).unwrap();
        assert!(creds.request(()).is_err());
        let none = Credentials::new(AuthToken::None, "c".into(), vec![]);
        assert!(none
            .request(())
            .unwrap()
            .metadata()
            .get("authorization")
            .is_none());
    }

    #[tokio::test]
    async fn channels_need_readable_roots_and_a_valid_address() {
        let target = GrpcTarget {
            address: "https://istiod.example:15012".into(),
            root: RootCa::File("/nonexistent/root.pem".into()),
            alt_hostname: None,
            headers: vec![],
        };
        let err = channel(&target).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/root.pem"), "{err}");
        let bad = GrpcTarget {
            address: "https://exa mple:1".into(),
            ..target
        };
        assert!(channel(&bad).is_err());
    }
}
