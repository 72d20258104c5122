//! Endpoint choice for one cluster: load balancing, connection-pool limits, outlier detection.
//!
//! placeholder: replaced by the i12-l7 branch at merge. This stand-in picks round-robin with no limits and
//! no ejection; only the API (the one the data path codes against) is final.

// placeholder: replaced by the i12-l7 branch at merge

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::proto::waypoint as pb;

/// A cluster's endpoints and their runtime state.
pub struct Endpoints {
    uids: Vec<String>,
    next: AtomicUsize,
}

/// A place in the cluster's request budget, held for the request's life.
pub struct Permit;

/// How a request to an endpoint went.
pub enum Outcome {
    /// A response that is not an error.
    Success,
    /// A response with this status.
    Status(u16),
    /// The connection could not be made.
    ConnectFailure,
    /// The connection or stream was reset before a response.
    Reset,
}

/// Why a cluster could not be built (unused by the placeholder).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Never returned by the placeholder.
    #[error("invalid cluster {0}")]
    Invalid(String),
}

impl Endpoints {
    /// The endpoints of `cluster`.
    pub fn new(cluster: &pb::Cluster) -> Endpoints {
        Endpoints {
            uids: cluster.endpoints.clone(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next endpoint's workload uid, avoiding `exclude` when another exists.
    pub fn pick(&self, _now: Instant, exclude: Option<&str>) -> Option<&str> {
        let n = self.uids.len();
        if n == 0 {
            return None;
        }
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            if n == 1 || Some(self.uids[i].as_str()) != exclude {
                return Some(&self.uids[i]);
            }
        }
        Some(&self.uids[0])
    }

    /// Records how a request to `endpoint` went.
    pub fn record(&self, _endpoint: &str, _outcome: Outcome, _now: Instant) {}

    /// A place for one more request, or `None` when the cluster is at its limit.
    pub fn admit(&self) -> Option<Permit> {
        Some(Permit)
    }
}
