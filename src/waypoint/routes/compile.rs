//! Compiling a proto `Route` into a [`Route`]: validation of names, values, statuses, URL parts and
//! durations, header operations sorted into Envoy's kinds, and Istio's retry-policy resolution. Every
//! error names the route and field.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;

use super::{
    Error, HeaderMatch, HeaderOps, Match, Redirect, RequestPart, RetryPolicy, Route, Str, Target,
};
use crate::proto::waypoint as pb;

/// Compilation of one route; every error names it.
struct Compiler {
    route: String,
}

impl Compiler {
    fn header_name(&self, field: &'static str, name: &str) -> Result<HeaderName, Error> {
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| Error::InvalidHeaderName {
            route: self.route.clone(),
            field,
            name: name.to_owned(),
        })
    }

    fn header_value(&self, field: &'static str, h: &pb::Header) -> Result<HeaderValue, Error> {
        HeaderValue::from_str(&h.value).map_err(|_| Error::InvalidHeaderValue {
            route: self.route.clone(),
            field,
            name: h.name.clone(),
        })
    }

    fn duration(
        &self,
        field: &'static str,
        d: Option<&prost_types::Duration>,
    ) -> Result<Option<Duration>, Error> {
        let Some(d) = d else { return Ok(None) };
        match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
            (Ok(s), Ok(n)) if n < 1_000_000_000 => {
                Ok(Some(Duration::new(s, n)).filter(|d| !d.is_zero()))
            }
            _ => Err(Error::InvalidDuration {
                route: self.route.clone(),
                field,
            }),
        }
    }

    fn matches(&self, m: &pb::RouteMatch) -> Result<Match, Error> {
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let header = match h.name.to_ascii_lowercase().as_str() {
                    ":authority" | "host" => RequestPart::Authority,
                    ":method" => RequestPart::Method,
                    ":path" => RequestPart::Path,
                    ":scheme" => RequestPart::Scheme,
                    _ => RequestPart::Header(self.header_name("matches.headers", &h.name)?),
                };
                Ok(HeaderMatch {
                    header,
                    value: h.value.as_ref().and_then(Str::compile),
                    invert: h.invert,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Match {
            path: m.path.as_ref().and_then(Str::compile).map(|p| match p {
                Str::Prefix(v) if m.path_segment_prefix => {
                    let trimmed = v.trim_end_matches('/');
                    if trimmed.is_empty() {
                        Str::Prefix("/".to_owned())
                    } else {
                        Str::SegmentPrefix(trimmed.to_owned())
                    }
                }
                other => other,
            }),
            headers,
            method: Some(m.method.clone()).filter(|m| !m.is_empty()),
            query: m
                .query_params
                .iter()
                .map(|q| (q.name.clone(), q.value.as_ref().and_then(Str::compile)))
                .collect(),
        })
    }

    /// Header operations; a `set`/`add` of the authority comes back as the second value.
    fn header_ops(
        &self,
        ops: Option<&pb::HeaderOps>,
        request: bool,
    ) -> Result<(HeaderOps, Option<HeaderValue>), Error> {
        let mut out = HeaderOps::default();
        let mut authority = None;
        let Some(ops) = ops else {
            return Ok((out, authority));
        };
        let (set_field, add_field, remove_field) = if request {
            (
                "request_headers.set",
                "request_headers.add",
                "request_headers.remove",
            )
        } else {
            (
                "response_headers.set",
                "response_headers.add",
                "response_headers.remove",
            )
        };
        let is_authority = |name: &str| {
            request
                && (name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority"))
        };
        let pseudo = |field, name: &str| Error::InvalidHeaderName {
            route: self.route.clone(),
            field,
            name: name.to_owned(),
        };
        for (field, list, append) in [(set_field, &ops.set, false), (add_field, &ops.add, true)] {
            for h in list {
                let value = self.header_value(field, h)?;
                if is_authority(&h.name) {
                    authority = Some(value);
                } else if h.name.starts_with(':') {
                    return Err(pseudo(field, &h.name));
                } else {
                    let entry = (self.header_name(field, &h.name)?, value);
                    if append {
                        out.add.push(entry);
                    } else {
                        out.set.push(entry);
                    }
                }
            }
        }
        for name in &ops.remove {
            if is_authority(name) {
                continue;
            }
            if name.starts_with(':') {
                return Err(pseudo(remove_field, name));
            }
            out.remove.push(self.header_name(remove_field, name)?);
        }
        Ok((out, authority))
    }

    fn target(&self, action: Option<&pb::route::Action>) -> Result<Target, Error> {
        let invalid = |field, value: String| Error::InvalidUrlPart {
            route: self.route.clone(),
            field,
            value,
        };
        match action {
            None => Err(Error::NoAction {
                route: self.route.clone(),
            }),
            Some(pb::route::Action::Forward(f)) => {
                let mut total: u32 = 0;
                let mut backends = Vec::with_capacity(f.backends.len());
                for (index, b) in f.backends.iter().enumerate() {
                    if b.cluster.is_empty() {
                        return Err(Error::EmptyCluster {
                            route: self.route.clone(),
                            index,
                        });
                    }
                    total = total.checked_add(b.weight).ok_or(Error::WeightOverflow {
                        route: self.route.clone(),
                    })?;
                    backends.push((b.cluster.clone(), b.weight));
                }
                Ok(Target::Forward { backends, total })
            }
            Some(pb::route::Action::Redirect(r)) => {
                let status = match r.status {
                    0 => StatusCode::MOVED_PERMANENTLY,
                    s @ (301 | 302 | 303 | 307 | 308) => {
                        StatusCode::from_u16(s as u16).expect("a redirect status")
                    }
                    s => {
                        return Err(Error::InvalidStatus {
                            route: self.route.clone(),
                            field: "redirect.status",
                            status: s,
                        })
                    }
                };
                let scheme = Some(r.scheme.to_ascii_lowercase()).filter(|s| !s.is_empty());
                if let Some(s) = &scheme {
                    if !s
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c))
                    {
                        return Err(invalid("redirect.scheme", r.scheme.clone()));
                    }
                }
                let port = match r.port {
                    0 => None,
                    p => Some(
                        u16::try_from(p).map_err(|_| invalid("redirect.port", p.to_string()))?,
                    ),
                };
                let host = Some(r.host.clone()).filter(|h| !h.is_empty());
                if host
                    .as_ref()
                    .is_some_and(|h| h.parse::<http::uri::Authority>().is_err())
                {
                    return Err(invalid("redirect.host", r.host.clone()));
                }
                let path = Some(r.path.clone()).filter(|p| !p.is_empty());
                if path.as_ref().is_some_and(|p| {
                    !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err()
                }) {
                    return Err(invalid("redirect.path", r.path.clone()));
                }
                let path_prefix = Some(r.path_prefix.clone()).filter(|p| !p.is_empty());
                if path_prefix.as_ref().is_some_and(|p| {
                    !p.starts_with('/')
                        || p.contains(['?', '#'])
                        || p.parse::<http::uri::PathAndQuery>().is_err()
                }) {
                    return Err(invalid("redirect.path_prefix", r.path_prefix.clone()));
                }
                Ok(Target::Redirect(Redirect {
                    scheme,
                    host,
                    port,
                    path,
                    path_prefix,
                    status,
                }))
            }
            Some(pb::route::Action::DirectResponse(d)) => {
                let status = u16::try_from(d.status)
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or(Error::InvalidStatus {
                        route: self.route.clone(),
                        field: "direct_response.status",
                        status: d.status,
                    })?;
                Ok(Target::Direct {
                    status,
                    body: d.body.clone(),
                })
            }
        }
    }

    fn retry(&self, r: Option<&pb::RetryPolicy>) -> Result<RetryPolicy, Error> {
        let Some(r) = r else {
            return Ok(RetryPolicy::istio_default());
        };
        if r.attempts == 0 {
            return Ok(RetryPolicy::none());
        }
        let mut policy = RetryPolicy {
            attempts: r.attempts,
            per_try_timeout: self
                .duration("retries.per_try_timeout", r.per_try_timeout.as_ref())?,
            ..RetryPolicy::istio_default()
        };
        if r.retry_on.is_empty() && r.retriable_status_codes.is_empty() {
            return Ok(policy);
        }
        // Conditions given: they replace the default ones (Istio's `parseRetryOn`).
        policy = RetryPolicy {
            attempts: policy.attempts,
            per_try_timeout: policy.per_try_timeout,
            ..RetryPolicy::none()
        };
        let status = |s: u32| -> Result<u16, Error> {
            u16::try_from(s)
                .ok()
                .filter(|s| (100..=599).contains(s))
                .ok_or(Error::InvalidStatus {
                    route: self.route.clone(),
                    field: "retries.retriable_status_codes",
                    status: s,
                })
        };
        let entries = r.retry_on.iter().flat_map(|s| s.split(','));
        for entry in entries.map(str::trim).filter(|e| !e.is_empty()) {
            match entry {
                "connect-failure" => policy.on_connect_failure = true,
                "refused-stream" => policy.on_refused_stream = true,
                "unavailable" => policy.on_unavailable = true,
                "cancelled" => policy.on_cancelled = true,
                "reset" => policy.on_reset = true,
                "5xx" => policy.on_5xx = true,
                "gateway-error" => policy.on_gateway_error = true,
                // Only meaningful with codes, which (as in Istio) turn it on by themselves.
                "retriable-status-codes" => {}
                "retriable-4xx" => policy.retriable_status_codes.push(409),
                _ => match entry.parse::<u32>() {
                    Ok(code) => policy.retriable_status_codes.push(status(code)?),
                    Err(_) => {
                        return Err(Error::UnsupportedRetryOn {
                            route: self.route.clone(),
                            value: entry.to_owned(),
                        })
                    }
                },
            }
        }
        for code in &r.retriable_status_codes {
            policy.retriable_status_codes.push(status(*code)?);
        }
        policy.retriable_status_codes.sort_unstable();
        policy.retriable_status_codes.dedup();
        Ok(policy)
    }
}

impl Route {
    pub(super) fn compile(r: &pb::Route, index: usize) -> Result<Route, Error> {
        let c = Compiler {
            route: if r.name.is_empty() {
                format!("routes[{index}]")
            } else {
                r.name.clone()
            },
        };
        let (request_ops, set_authority) = c.header_ops(r.request_headers.as_ref(), true)?;
        let (response_ops, _) = c.header_ops(r.response_headers.as_ref(), false)?;
        let rewrite = r.rewrite.clone().unwrap_or_default();
        let authority = if rewrite.authority.is_empty() {
            set_authority
        } else {
            let v = HeaderValue::from_str(&rewrite.authority)
                .ok()
                .filter(|_| rewrite.authority.parse::<http::uri::Authority>().is_ok())
                .ok_or_else(|| Error::InvalidUrlPart {
                    route: c.route.clone(),
                    field: "rewrite.authority",
                    value: rewrite.authority.clone(),
                })?;
            Some(v)
        };
        let path_prefix = Some(rewrite.path_prefix).filter(|p| !p.is_empty());
        if let Some(p) = &path_prefix {
            if p.contains(['?', '#']) || p.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(Error::InvalidUrlPart {
                    route: c.route,
                    field: "rewrite.path_prefix",
                    value: p.clone(),
                });
            }
        }
        let full_path = Some(rewrite.full_path).filter(|p| !p.is_empty());
        if let Some(p) = &full_path {
            if !p.starts_with('/')
                || p.contains(['?', '#'])
                || p.parse::<http::uri::PathAndQuery>().is_err()
            {
                return Err(Error::InvalidUrlPart {
                    route: c.route,
                    field: "rewrite.full_path",
                    value: p.clone(),
                });
            }
        }
        Ok(Route {
            matches: r
                .matches
                .iter()
                .map(|m| c.matches(m))
                .collect::<Result<_, _>>()?,
            target: c.target(r.action.as_ref())?,
            request_ops,
            response_ops,
            authority,
            path_prefix,
            full_path,
            timeout: c.duration("timeout", r.timeout.as_ref())?,
            retry: c.retry(r.retries.as_ref())?,
            name: c.route,
        })
    }
}
