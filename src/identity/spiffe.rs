//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Input: the URI strings found in certificate SANs, config and xDS. Output: a parsed [`Identity`]
//! that compares, hashes and prints back to exactly the same URI. Nothing else here.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The SPIFFE URI scheme prefix.
const SCHEME: &str = "spiffe://";

/// A workload identity. Cheap to clone (one `Arc`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a SPIFFE workload identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// The string does not start with `spiffe://`.
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    /// The path is not `<td>/ns/<ns>/sa/<sa>` with non-empty segments.
    #[error("identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
}

impl Identity {
    /// Builds an identity from its three parts. Parts must be non-empty and contain no `/`.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, ParseError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// How many holders share this value (the state's interner forgets identities only it holds).
    pub(crate) fn strong_count(id: &Identity) -> usize {
        Arc::strong_count(&id.0)
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The identity without its scheme, as Istio principals are written:
    /// `cluster.local/ns/default/sa/productpage`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain(),
            self.namespace(),
            self.service_account()
        )
    }
}

impl FromStr for Identity {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| ParseError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity(Arc::new(Parts {
                    trust_domain: td.to_string(),
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })))
            }
            _ => Err(ParseError::Shape(s.to_string())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain(),
            self.namespace(),
            self.service_account()
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back_the_same_uri() {
        let s = "spiffe://cluster.local/ns/default/sa/productpage";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "productpage");
        assert_eq!(id.to_string(), s);
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/productpage");
    }

    #[test]
    fn refuses_uris_that_are_not_workload_identities() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/namespace/a/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} accepted");
        }
    }
}
