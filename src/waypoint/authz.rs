//! L7 authorization at the waypoint: Istio `AuthorizationPolicy` (ALLOW / DENY, with `to.operation` and
//! `when`) evaluated per HTTP request, with the semantics of the Envoy RBAC filters istiod configures on
//! its waypoints.
//!
//! Owner: the waypoint. Whoever applies a new `Waypoint` configuration builds one [`Authorizer`] per
//! service from the waypoint-wide policies followed by that service's own (both apply, in one evaluation);
//! the request handler calls [`Authorizer::check`] and answers a [`Decision::Deny`] with Envoy's
//! `403 RBAC: access denied`. No I/O, no locks: an `Authorizer` is immutable and shared.
//!
//! **Inputs.** `crate::proto::waypoint::AuthorizationPolicy` values (strings in Istio's forms, see
//! `proto/waypoint.proto`); per request a [`Request`]. **Outputs.** An [`Authorizer`] or an [`Error`]
//! naming the policy and field; per request a [`Decision`]. Matches of dry-run policies are logged
//! (`info`), denials at `debug`.
//!
//! **Evaluation** (Istio's documented order, as the waypoint's RBAC filters apply it):
//! 1. Dry-run policies (`istio.io/dry-run`) are evaluated and logged, never enforced; a dry-run ALLOW
//!    policy does not count as "an ALLOW policy applies".
//! 2. Any matching DENY policy denies ([`Decision::Deny`] names the first, `namespace/name`).
//! 3. If no ALLOW policy applies the request is allowed; if one matches it is allowed; otherwise denied
//!    (`policy` = `""`). An ALLOW policy with no rules is such a policy that never matches (allow-nothing);
//!    a DENY policy with no rules denies nothing.
//! 4. A policy matches if any rule does. A rule matches if its `from` (any entry), `to` (any entry) and
//!    every `when` condition match; an empty list imposes nothing, so a rule with no fields matches every
//!    request. Within a source or operation every populated field must pass, and a field with values and
//!    `not_` values passes when (any value matches) and (no `not_` value matches) — Istio's `not_*` is
//!    `NOT(OR(...))`, so an absent attribute passes every `not_` list.
//!
//! **Fields**, as istiod translates them for Envoy:
//! - `principals`, `source.principal`: the client's SPIFFE id without `spiffe://`; `"*"` = any identity.
//!   Without an identity (or with one that is not a SPIFFE URI) no value matches.
//! - `namespaces`, `source.namespace`: Istio's regex `.*/ns/<value>/.*` on the SPIFFE URI (emulated).
//! - `source.serviceAccount`: `ns/sa` (or `sa`, in the policy's namespace) equal to the identity's.
//! - `ip_blocks`, `source.ip`: the connection's source address (Envoy `direct_remote_ip`); `remote_ip_blocks`,
//!   `remote.ip`: Envoy's `remote_ip`, which on a waypoint (`use_remote_address: false`, no trusted hops) is
//!   the last address of the last `X-Forwarded-For` header, else the source address — client-supplied, as
//!   in Istio. IPv4-mapped IPv6 addresses compare as IPv4.
//! - `hosts`: the Host / `:authority` exactly as received, ASCII case-insensitive (Istio's `HostMatcher`:
//!   no port stripping, so `example.com` does not match `example.com:8080`; Istio's security best
//!   practices tell users to list `example.com:*` too).
//! - `methods`: `:method`, case-sensitive; `paths`: the path without query or fragment (Envoy's
//!   `PathMatcher`), including Istio's path templates (`{*}` one segment, `{**}` the rest, last).
//! - `ports`, `destination.port`: the destination port; `destination.ip`: the destination address.
//! - `request.headers[name]`: all values of the header joined with `,` (Envoy); `"*"` = present. The names
//!   `:authority` and `host` read the Host / `:authority`, `:method` the method, `:path` the path.
//! - `request.auth.*`: there is no JWT authentication here, so these attributes are absent: a value never
//!   matches and a `not_values` list always passes (as Envoy behaves for a request without a JWT).
//! - Any other key (e.g. `connection.sni`, `experimental.*`) should have been refused by the control
//!   plane; if one arrives it fails safe: the condition does not match in an ALLOW policy and matches in a
//!   DENY policy.
//!
//! **Refusals** ([`Error`], the whole set): an unknown action, empty values, bad CIDRs, ports and header
//! names, misplaced path-template operators, a `*` inside a namespace, and empty sources, operations and
//! conditions (Istio's validation refuses these; istiod's generator would turn an empty source into
//! "matches everything"). A caller that cannot build an `Authorizer` from new policies should keep
//! enforcing something no wider: [`Authorizer::refusing`] denies every request.
//!
//! **Hot path.** `check` does not allocate when it allows, except to join a header that is repeated in the
//! request and named by a `request.headers` condition.

mod compile;
mod pattern;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use http::header::HeaderName;
use http::HeaderMap;
use ipnet::IpNet;
use tracing::{debug, info};

use crate::proto::waypoint as pb;
use pattern::{PathPattern, Pattern, Peer};

/// One HTTP request, as authorization sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `:method`.
    pub method: &'a str,
    /// The path as received (origin form), possibly with `?query`.
    pub path: &'a str,
    /// Host / `:authority`.
    pub host: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The client's SPIFFE id (`spiffe://td/ns/x/sa/y`, from the HBONE peer certificate); `None` without one.
    pub source_principal: Option<&'a str>,
    /// The address the client's connection came from.
    pub source_ip: IpAddr,
    /// The destination the client asked for (service VIP or pod IP).
    pub destination_ip: IpAddr,
    /// The destination port the client asked for (the service port).
    pub destination_port: u16,
}

/// The outcome of [`Authorizer::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The request may proceed.
    Allow,
    /// Answer 403 `RBAC: access denied`.
    Deny {
        /// `namespace/name` of the DENY policy that matched, or `""` when ALLOW policies apply and none
        /// matched.
        policy: String,
    },
}

impl Decision {
    /// Whether the request may proceed.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Which list of a rule a refused value sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `rules[].from[].source`.
    From,
    /// `rules[].to[].operation`.
    To,
    /// `rules[].when[]`.
    When,
}

/// Where in a policy a refused value sits: `rules[rule].<part>[index].<field>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Index of the rule.
    pub rule: usize,
    /// `from`, `to` or `when`.
    pub part: Part,
    /// Index in that list.
    pub index: usize,
    /// The field, named as in the policy YAML (`ipBlocks`, `notPaths`, `values`, …).
    pub name: &'static str,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = match self.part {
            Part::From => "from",
            Part::To => "to",
            Part::When => "when",
        };
        write!(f, "rules[{}].{part}[{}]", self.rule, self.index)?;
        if !self.name.is_empty() {
            write!(f, ".{}", self.name)?;
        }
        Ok(())
    }
}

/// A policy that cannot be enforced as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The action is neither ALLOW nor DENY.
    #[error("policy {policy}: unknown action {action}")]
    UnknownAction {
        /// `namespace/name`.
        policy: String,
        /// The wire value.
        action: i32,
    },
    /// An empty string in a value list (Istio's validation refuses it).
    #[error("policy {policy}: {field}: empty value")]
    EmptyValue {
        /// `namespace/name`.
        policy: String,
        /// Where.
        field: Field,
    },
    /// An IP list entry that is neither an address nor a CIDR.
    #[error("policy {policy}: {field}: {value:?} is not an IP address or CIDR")]
    InvalidCidr {
        /// `namespace/name`.
        policy: String,
        /// Where.
        field: Field,
        /// As written.
        value: String,
    },
    /// A port that is not a number in 0–65535.
    #[error("policy {policy}: {field}: {value:?} is not a port number")]
    InvalidPort {
        /// `namespace/name`.
        policy: String,
        /// Where.
        field: Field,
        /// As written.
        value: String,
    },
    /// A `request.headers[...]` key whose name is missing or not a valid header name.
    #[error("policy {policy}: {field}: {key:?} does not name a valid header")]
    InvalidHeaderKey {
        /// `namespace/name`.
        policy: String,
        /// Where.
        field: Field,
        /// The condition key as written.
        key: String,
    },
    /// A path template with `{**}` before the last segment, or an operator inside a segment.
    #[error("policy {policy}: {field}: {value:?} is not a valid path template ({{**}} must end the path, operators must be whole segments)")]
    InvalidPathTemplate {
        /// `namespace/name`.
        policy: String,
        /// Where.
        field: Field,
        /// As written.
        value: String,
    },
    /// A namespace value with a `*` that is not its first or last character.
    #[error("policy {policy}: {field}: {value:?}: a `*` may only start or end a value")]
    MisplacedWildcard {
        /// `namespace/name`.
        policy: String,
        /// Where.
        field: Field,
        /// As written.
        value: String,
    },
    /// A `from` entry with no field set (Istio: "`from.source` must not be empty").
    #[error("policy {policy}: {field}: empty source")]
    EmptySource {
        /// `namespace/name`.
        policy: String,
        /// Where (`name` is empty).
        field: Field,
    },
    /// A `to` entry with no field set (Istio: "`to.operation` must not be empty").
    #[error("policy {policy}: {field}: empty operation")]
    EmptyOperation {
        /// `namespace/name`.
        policy: String,
        /// Where (`name` is empty).
        field: Field,
    },
    /// A condition with neither `values` nor `notValues`.
    #[error("policy {policy}: {field}: condition {key:?} has neither values nor notValues")]
    EmptyCondition {
        /// `namespace/name`.
        policy: String,
        /// Where (`name` is empty).
        field: Field,
        /// The key as written.
        key: String,
    },
}

/// Compiled policies, immutable; see the module docs for the semantics.
#[derive(Debug, Default)]
pub struct Authorizer {
    dry_run_deny: Vec<Policy>,
    deny: Vec<Policy>,
    dry_run_allow: Vec<Policy>,
    allow: Vec<Policy>,
    /// Set by [`Authorizer::refusing`]: every request is denied naming this.
    refusing: Option<String>,
}

impl Authorizer {
    /// Compiles waypoint-wide and per-service policies (pass both, in that order). Refuses the set with
    /// an [`Error`] naming the policy and field when a value cannot be enforced as written.
    pub fn new(policies: &[pb::AuthorizationPolicy]) -> Result<Authorizer, Error> {
        let mut authorizer = Authorizer::default();
        for p in policies {
            let policy = Policy::compile(p)?;
            let list = match (policy.action, p.dry_run) {
                (Action::Deny, true) => &mut authorizer.dry_run_deny,
                (Action::Deny, false) => &mut authorizer.deny,
                (Action::Allow, true) => &mut authorizer.dry_run_allow,
                (Action::Allow, false) => &mut authorizer.allow,
            };
            list.push(policy);
        }
        Ok(authorizer)
    }

    /// An authorizer that denies every request, naming `policy`: what to enforce when new policies were
    /// refused and no earlier good set is kept, so that a refusal never widens access.
    pub fn refusing(policy: impl Into<String>) -> Authorizer {
        Authorizer {
            refusing: Some(policy.into()),
            ..Authorizer::default()
        }
    }

    /// Whether there are no policies (every request is allowed).
    pub fn is_empty(&self) -> bool {
        self.refusing.is_none()
            && self.dry_run_deny.is_empty()
            && self.deny.is_empty()
            && self.dry_run_allow.is_empty()
            && self.allow.is_empty()
    }

    /// Decides one request. Does not allocate when it allows (see the module docs for the one exception).
    pub fn check(&self, req: &Request<'_>) -> Decision {
        if let Some(policy) = &self.refusing {
            return Decision::Deny {
                policy: policy.clone(),
            };
        }
        let ctx = Context::new(req);
        for p in &self.dry_run_deny {
            if p.matches(&ctx) {
                info!(policy = %p.key, method = req.method, path = req.path, "dry-run: deny policy would deny");
            }
        }
        for p in &self.deny {
            if p.matches(&ctx) {
                debug!(policy = %p.key, method = req.method, path = req.path, "denied by policy");
                return Decision::Deny {
                    policy: p.key.clone(),
                };
            }
        }
        for p in &self.dry_run_allow {
            let verdict = if p.matches(&ctx) {
                "would allow"
            } else {
                "would not allow"
            };
            info!(policy = %p.key, method = req.method, path = req.path, "dry-run: allow policy {verdict}");
        }
        if self.allow.is_empty() || self.allow.iter().any(|p| p.matches(&ctx)) {
            return Decision::Allow;
        }
        debug!(
            method = req.method,
            path = req.path,
            "allow policies apply, but none matched"
        );
        Decision::Deny {
            policy: String::new(),
        }
    }
}

/// What a policy does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug)]
struct Policy {
    key: String,
    action: Action,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

/// Values and `not_` values of one field.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Values<T> {
    any_of: Vec<T>,
    none_of: Vec<T>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Values {
            any_of: Vec::new(),
            none_of: Vec::new(),
        }
    }
}

impl<T> Values<T> {
    fn is_empty(&self) -> bool {
        self.any_of.is_empty() && self.none_of.is_empty()
    }

    /// (no values OR any value matches) AND no `not_` value matches.
    fn passes(&self, pred: impl Fn(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&pred)) && !self.none_of.iter().any(&pred)
    }
}

#[derive(Debug, Default)]
struct Source {
    principals: Values<Pattern>,
    namespaces: Values<Pattern>,
    ip_blocks: Values<IpNet>,
    remote_ip_blocks: Values<IpNet>,
}

#[derive(Debug, Default)]
struct Operation {
    hosts: Values<Pattern>,
    ports: Values<u16>,
    methods: Values<Pattern>,
    paths: Values<PathPattern>,
}

/// What a `request.headers[...]` condition reads.
#[derive(Debug)]
enum HeaderKey {
    Name(HeaderName),
    Authority,
    Method,
    Path,
}

#[derive(Debug)]
enum Condition {
    Header(HeaderKey, Values<Pattern>),
    SourceIp(Values<IpNet>),
    RemoteIp(Values<IpNet>),
    DestinationIp(Values<IpNet>),
    DestinationPort(Values<u16>),
    SourceNamespace(Values<Pattern>),
    SourcePrincipal(Values<Pattern>),
    SourceServiceAccount(Values<(String, String)>),
    /// `request.auth.*`: the attribute is absent; `has_values` says whether the condition lists values.
    RequestAuth {
        has_values: bool,
    },
    /// A key this waypoint does not know: matches exactly when the policy is a DENY (fail safe).
    Unknown {
        matches: bool,
    },
}

/// Per-request values, computed once per check.
struct Context<'r, 'a> {
    req: &'r Request<'a>,
    peer: Peer<'a>,
    /// The path without query or fragment.
    path: &'a str,
    source_ip: IpAddr,
    destination_ip: IpAddr,
}

impl<'r, 'a> Context<'r, 'a> {
    fn new(req: &'r Request<'a>) -> Self {
        let path = req.path.split(['?', '#']).next().unwrap_or_default();
        Context {
            req,
            peer: Peer::parse(req.source_principal),
            path,
            source_ip: req.source_ip.to_canonical(),
            destination_ip: req.destination_ip.to_canonical(),
        }
    }

    /// Envoy's `remote_ip` with `use_remote_address: false` and no trusted hops: the last address of the
    /// last `X-Forwarded-For`, else the connection's source.
    fn remote_ip(&self) -> IpAddr {
        self.req
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .unwrap_or(self.source_ip)
    }

    /// The value a `request.headers[...]` condition compares; `None` when absent.
    fn header(&self, key: &HeaderKey) -> Option<Cow<'a, [u8]>> {
        match key {
            HeaderKey::Authority => Some(Cow::Borrowed(self.req.host.as_bytes())),
            HeaderKey::Method => Some(Cow::Borrowed(self.req.method.as_bytes())),
            HeaderKey::Path => Some(Cow::Borrowed(self.req.path.as_bytes())),
            HeaderKey::Name(name) => joined_header(self.req.headers, name),
        }
    }
}

/// All values of `name` joined with `,`, as Envoy's header matchers see them; `None` when absent.
fn joined_header<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let mut joined = Vec::with_capacity(first.len() + 1 + second.len());
    joined.extend_from_slice(first.as_bytes());
    for v in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(v.as_bytes());
    }
    Some(Cow::Owned(joined))
}

impl Policy {
    fn matches(&self, ctx: &Context<'_, '_>) -> bool {
        self.rules.iter().any(|r| r.matches(ctx))
    }
}

impl Rule {
    fn matches(&self, ctx: &Context<'_, '_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(ctx)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(ctx)))
            && self.when.iter().all(|c| c.matches(ctx))
    }
}

impl Source {
    fn matches(&self, ctx: &Context<'_, '_>) -> bool {
        self.ip_blocks.passes(|n| n.contains(&ctx.source_ip))
            && self
                .principals
                .passes(|p| p.matches(ctx.peer.principal.map(str::as_bytes)))
            && self
                .namespaces
                .passes(|p| p.matches_namespace_of(ctx.peer.uri))
            && (self.remote_ip_blocks.is_empty() || {
                let remote = ctx.remote_ip();
                self.remote_ip_blocks.passes(|n| n.contains(&remote))
            })
    }
}

impl Operation {
    fn matches(&self, ctx: &Context<'_, '_>) -> bool {
        let host = (!ctx.req.host.is_empty()).then_some(ctx.req.host.as_bytes());
        self.ports.passes(|p| *p == ctx.req.destination_port)
            && self
                .methods
                .passes(|p| p.matches(Some(ctx.req.method.as_bytes())))
            && self.paths.passes(|p| p.matches(ctx.path))
            && self.hosts.passes(|p| p.matches_ignore_case(host))
    }
}

impl Condition {
    fn matches(&self, ctx: &Context<'_, '_>) -> bool {
        match self {
            Condition::Header(key, values) => {
                let value = ctx.header(key);
                values.passes(|p| p.matches(value.as_deref()))
            }
            Condition::SourceIp(v) => v.passes(|n| n.contains(&ctx.source_ip)),
            Condition::RemoteIp(v) => {
                let remote = ctx.remote_ip();
                v.passes(|n| n.contains(&remote))
            }
            Condition::DestinationIp(v) => v.passes(|n| n.contains(&ctx.destination_ip)),
            Condition::DestinationPort(v) => v.passes(|p| *p == ctx.req.destination_port),
            Condition::SourceNamespace(v) => v.passes(|p| p.matches_namespace_of(ctx.peer.uri)),
            Condition::SourcePrincipal(v) => {
                v.passes(|p| p.matches(ctx.peer.principal.map(str::as_bytes)))
            }
            Condition::SourceServiceAccount(v) => v.passes(|(ns, sa)| {
                ctx.peer.namespace_and_account == Some((ns.as_str(), sa.as_str()))
            }),
            Condition::RequestAuth { has_values } => !has_values,
            Condition::Unknown { matches } => *matches,
        }
    }
}
