//! L7 authorization at the waypoint (Istio AuthorizationPolicy on HTTP requests).
//!
//! placeholder: replaced by the i12-l7 branch at merge. This stand-in allows every request; only the API
//! (the one the data path codes against) is final.

// placeholder: replaced by the i12-l7 branch at merge

use crate::proto::waypoint as pb;

/// One request as authorization sees it.
pub struct Request<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path` (with the query).
    pub path: &'a str,
    /// `:authority` / `Host`.
    pub host: &'a str,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// The client's identity, `spiffe://td/ns/x/sa/y`.
    pub source_principal: Option<&'a str>,
    /// The client's address.
    pub source_ip: std::net::IpAddr,
    /// The destination address the client dialled (service VIP or workload IP).
    pub destination_ip: std::net::IpAddr,
    /// The destination port the client dialled.
    pub destination_port: u16,
}

/// The answer.
pub enum Decision {
    /// Let the request through.
    Allow,
    /// Refuse it (403 `RBAC: access denied`).
    Deny {
        /// The deciding policy, `namespace/name`.
        policy: String,
    },
}

/// Policies compiled for evaluation.
pub struct Authorizer {
    empty: bool,
}

/// Why policies could not be compiled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Never returned by the placeholder.
    #[error("invalid policy {0}")]
    Invalid(String),
}

impl Authorizer {
    /// Compiles `policies`.
    pub fn new(policies: &[pb::AuthorizationPolicy]) -> Result<Authorizer, Error> {
        Ok(Authorizer {
            empty: policies.is_empty(),
        })
    }

    /// Decides on `req` (placeholder: always allows).
    pub fn check(&self, _req: &Request<'_>) -> Decision {
        Decision::Allow
    }

    /// No policy at all.
    pub fn is_empty(&self) -> bool {
        self.empty
    }
}
