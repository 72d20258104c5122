//! [`RetryPolicy`]: a route's retries, resolved, and what each outcome of a try means for them.

use http::StatusCode;
use std::time::Duration;

/// A route's retry policy, resolved (see the module docs). `attempts` counts retries after the first try.
/// The conditions keep Envoy's meanings: `on_unavailable` and `on_cancelled` are gRPC statuses (14 and
/// 1, see [`RetryPolicy::retries_grpc_status`]), not HTTP codes; Istio's default still retries HTTP 503
/// because its `retriable_status_codes` holds 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try; 0: none.
    pub attempts: u32,
    /// Timeout of each try; `None`: only the route timeout.
    pub per_try_timeout: Option<Duration>,
    /// `connect-failure`: the upstream connection (or its tunnel) could not be opened.
    pub on_connect_failure: bool,
    /// `refused-stream`: the upstream reset the HTTP/2 stream with REFUSED_STREAM.
    pub on_refused_stream: bool,
    /// `unavailable`: gRPC status 14 in the response.
    pub on_unavailable: bool,
    /// `cancelled`: gRPC status 1 in the response.
    pub on_cancelled: bool,
    /// `reset`: no response at all (disconnect, reset, per-try timeout).
    pub on_reset: bool,
    /// `5xx`: any 5xx response, or no response at all.
    pub on_5xx: bool,
    /// `gateway-error`: 502, 503 or 504, or no response at all.
    pub on_gateway_error: bool,
    /// `retriable-status-codes` (and `retriable-4xx`, 409): these statuses.
    pub retriable_status_codes: Vec<u16>,
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            attempts: 0,
            per_try_timeout: None,
            on_connect_failure: false,
            on_refused_stream: false,
            on_unavailable: false,
            on_cancelled: false,
            on_reset: false,
            on_5xx: false,
            on_gateway_error: false,
            retriable_status_codes: Vec::new(),
        }
    }

    /// Istio's default for a route without a retry policy (`retry.DefaultPolicy`).
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            on_connect_failure: true,
            on_refused_stream: true,
            on_unavailable: true,
            on_cancelled: true,
            retriable_status_codes: vec![503],
            ..RetryPolicy::none()
        }
    }

    /// Whether a response with this status is retried (`5xx`, `gateway-error`, retriable codes).
    pub fn retries_status(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        (self.on_5xx && status.is_server_error())
            || (self.on_gateway_error && matches!(code, 502..=504))
            || self.retriable_status_codes.contains(&code)
    }

    /// Whether a failure to open the upstream connection is retried.
    pub fn retries_connect_failure(&self) -> bool {
        self.on_connect_failure || self.on_reset || self.on_5xx || self.on_gateway_error
    }

    /// Whether a REFUSED_STREAM reset is retried.
    pub fn retries_refused_stream(&self) -> bool {
        self.on_refused_stream || self.on_reset || self.on_5xx || self.on_gateway_error
    }

    /// Whether a reset or disconnect before the response headers (or a per-try timeout) is retried.
    pub fn retries_reset(&self) -> bool {
        self.on_reset || self.on_5xx || self.on_gateway_error
    }

    /// Whether a gRPC response with this `grpc-status` is retried (`cancelled` 1, `unavailable` 14).
    pub fn retries_grpc_status(&self, grpc_status: u32) -> bool {
        (self.on_cancelled && grpc_status == 1) || (self.on_unavailable && grpc_status == 14)
    }
}
