//! The mesh file's entry points: [`MeshConfig::parse`], [`MeshConfig::load`] and [`MeshConfig::validate`].
//!
//! Input: YAML text or a file. Output: a [`MeshConfig`] the control plane can serve, or the first
//! [`Error`] naming the field. Validation is the format (`config.rs`, serde), the file's own fields
//! ([`MeshConfig::check_fields`]), then the translation of the `istio:` objects for node proxies
//! (`istio.rs`), of the networks and their east-west gateways (`topology.rs`, which also checks that pod
//! IPs are unique per network), for waypoints (`waypoints.rs`) and of ServiceEntries
//! (`service_entries.rs`), which refuse bad objects by name, then what joins them: the policy keys pods
//! name must exist, and `policies` and the Istio objects may not make the same policy. This module sits
//! above `config`, `topology`, `istio`, `waypoints` and `service_entries` so that none of them depends on
//! another in a circle.

use std::path::Path;

use super::config::{read_file, Error, MeshConfig};
use super::topology::Topology;
use super::{istio, waypoints};
use crate::authz::PolicySet;

impl MeshConfig {
    /// Parses and validates YAML text. An empty text is an empty mesh.
    pub fn parse(yaml: &str) -> Result<MeshConfig, Error> {
        let cfg = MeshConfig::from_yaml(yaml)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file (at most [`super::config::MAX_FILE_BYTES`]).
    pub fn load(path: &Path) -> Result<(crate::file_watch::Seen, MeshConfig), Error> {
        let bytes = read_file(path)?;
        let cfg = MeshConfig::parse(&String::from_utf8_lossy(&bytes))?;
        Ok((crate::file_watch::Seen::of(&bytes), cfg))
    }

    /// Checks everything: the fields, the Istio and Gateway API objects, and the references between them.
    pub fn validate(&self) -> Result<(), Error> {
        self.check_fields()?;
        let converted = istio::convert(self)?;
        Topology::convert(self)?;
        waypoints::convert(self, &converted)?;
        let entries = super::service_entries::convert(self)?;
        for s in &entries.services {
            if self.services.iter().any(|k| {
                k.namespace == s.namespace
                    && self.service_hostname(&k.namespace, &k.name) == s.hostname
            }) {
                return Err(Error::Invalid {
                    field: "istio".into(),
                    reason: format!(
                        "ServiceEntry host {} in {} is also a Service's hostname there",
                        s.hostname, s.namespace
                    ),
                });
            }
        }
        let invalid = |field: String, reason: String| Error::Invalid { field, reason };
        for (i, w) in self.workloads.iter().enumerate() {
            for (k, key) in w.authorization_policies.iter().enumerate() {
                let mut known = self.policies.iter().chain(&converted.policies);
                if !known.any(|p| &p.key() == key) {
                    return Err(invalid(
                        format!("workloads[{i}].authorizationPolicies[{k}]"),
                        format!("no policy {key:?} in policies or istio"),
                    ));
                }
            }
        }
        for p in &converted.policies {
            if self.policies.iter().any(|q| q.key() == p.key()) {
                return Err(invalid(
                    "policies".into(),
                    format!("policy {} is also made from the istio objects", p.key()),
                ));
            }
        }
        PolicySet::new(
            self.policies
                .iter()
                .chain(&converted.policies)
                .cloned()
                .collect(),
        )?;
        Ok(())
    }
}
