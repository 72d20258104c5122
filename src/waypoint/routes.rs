//! HTTP routes of one service port: matching, weighted actions, rewrites, header changes, retries, timeouts.
//!
//! placeholder: replaced by the i12-l7 branch at merge. This stand-in has one route that forwards every
//! request to the port's `default_cluster` with Istio's default retry policy; only the API (the one the
//! data path codes against) is final.

// placeholder: replaced by the i12-l7 branch at merge

use std::time::Duration;

use crate::proto::waypoint as pb;

/// A port's routes, in order.
pub struct RouteTable {
    route: Route,
}

/// One route.
pub struct Route {
    name: String,
    cluster: String,
    retry: RetryPolicy,
}

/// What to do with a request.
pub enum Action<'r> {
    /// Forward to this cluster.
    Forward(&'r str),
    /// Answer with this redirect.
    Redirect(http::Response<()>),
    /// Answer with this status and body.
    Direct {
        /// Status.
        status: http::StatusCode,
        /// Body.
        body: &'r str,
    },
}

/// Envoy's retry policy.
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Time limit of each try.
    pub per_try_timeout: Option<Duration>,
    /// `connect-failure`.
    pub on_connect_failure: bool,
    /// `refused-stream`.
    pub on_refused_stream: bool,
    /// `unavailable` (gRPC).
    pub on_unavailable: bool,
    /// `cancelled` (gRPC).
    pub on_cancelled: bool,
    /// `reset`.
    pub on_reset: bool,
    /// `5xx`.
    pub on_5xx: bool,
    /// `gateway-error`.
    pub on_gateway_error: bool,
    /// `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
}

impl RetryPolicy {
    /// Whether a response with `status` is retried.
    pub fn retries_status(&self, status: http::StatusCode) -> bool {
        let s = status.as_u16();
        (self.on_5xx && status.is_server_error())
            || (self.on_gateway_error && matches!(s, 502..=504))
            || self.retriable_status_codes.contains(&s)
    }
}

/// Why routes could not be compiled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Never returned by the placeholder.
    #[error("invalid route {0}")]
    Invalid(String),
}

impl RouteTable {
    /// Compiles the routes of `port`.
    pub fn new(port: &pb::Port) -> Result<RouteTable, Error> {
        Ok(RouteTable {
            route: Route {
                name: "default".to_string(),
                cluster: port.default_cluster.clone(),
                retry: RetryPolicy {
                    attempts: 2,
                    per_try_timeout: None,
                    on_connect_failure: true,
                    on_refused_stream: true,
                    on_unavailable: true,
                    on_cancelled: true,
                    on_reset: false,
                    on_5xx: false,
                    on_gateway_error: false,
                    retriable_status_codes: vec![503],
                },
            },
        })
    }

    /// The first route matching the request.
    pub fn select(&self, _parts: &http::request::Parts) -> Option<&Route> {
        Some(&self.route)
    }
}

impl Route {
    /// `<namespace>/<object>[.<index>]`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The action for this request; `roll` is uniform in `[0, total_weight)`.
    pub fn action(&self, _parts: &http::request::Parts, _roll: u32) -> Action<'_> {
        Action::Forward(&self.cluster)
    }

    /// Sum of the backend weights (at least 1).
    pub fn total_weight(&self) -> u32 {
        1
    }

    /// Rewrites and request header changes.
    pub fn apply_request(&self, _parts: &mut http::request::Parts) {}

    /// Response header changes.
    pub fn apply_response(&self, _parts: &mut http::response::Parts) {}

    /// Whole-request timeout.
    pub fn timeout(&self) -> Option<Duration> {
        None
    }

    /// Retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }
}
