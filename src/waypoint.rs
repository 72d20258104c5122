//! `meshnode waypoint`: the L7 proxy for one namespace (issue 12).
//!
//! Temporary module root of the `i12-l7` branch, which only adds the pure decision engines; the
//! plumbing branch owns this file and replaces it at merge.

pub mod authz;
pub mod balance;
pub mod routes;
