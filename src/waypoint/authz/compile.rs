//! Compiling proto `AuthorizationPolicy` values: Istio's value forms parsed, CIDRs, ports and header
//! names validated, condition keys sorted into the attributes this waypoint evaluates (unknown ones
//! fail safe for the policy's action). Every error names the policy and field.

use std::net::IpAddr;

use http::header::HeaderName;
use ipnet::IpNet;

use super::pattern::{PathPattern, Pattern, TemplateError};
use super::{
    Action, Condition, Error, Field, HeaderKey, Operation, Part, Policy, Rule, Source, Values,
};
use crate::proto::waypoint as pb;

/// Compilation of one policy; every error names `key` and the field.
struct Compiler<'p> {
    key: &'p str,
    namespace: &'p str,
}

impl Policy {
    pub(super) fn compile(p: &pb::AuthorizationPolicy) -> Result<Policy, Error> {
        let key = format!("{}/{}", p.namespace, p.name);
        let action = match pb::Action::try_from(p.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(Error::UnknownAction {
                    policy: key,
                    action: p.action,
                })
            }
        };
        let c = Compiler {
            key: &key,
            namespace: &p.namespace,
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for (r, rule) in p.rules.iter().enumerate() {
            rules.push(c.rule(r, rule, action)?);
        }
        Ok(Policy { key, action, rules })
    }
}

/// A list and its `not_` counterpart, with their field names.
type Pair<'v> = (&'v [String], &'static str, &'v [String], &'static str);

impl Compiler<'_> {
    fn rule(&self, r: usize, rule: &pb::Rule, action: Action) -> Result<Rule, Error> {
        let from = (rule.from.iter().enumerate())
            .map(|(i, s)| self.source(r, i, s))
            .collect::<Result<_, _>>()?;
        let to = (rule.to.iter().enumerate())
            .map(|(i, o)| self.operation(r, i, o))
            .collect::<Result<_, _>>()?;
        let when = (rule.when.iter().enumerate())
            .map(|(i, c)| self.condition(r, i, c, action))
            .collect::<Result<_, _>>()?;
        Ok(Rule { from, to, when })
    }

    fn source(&self, rule: usize, index: usize, s: &pb::Source) -> Result<Source, Error> {
        let at = |name| Field {
            rule,
            part: Part::From,
            index,
            name,
        };
        let source = Source {
            principals: self.patterns(
                at,
                (
                    &s.principals,
                    "principals",
                    &s.not_principals,
                    "notPrincipals",
                ),
                false,
            )?,
            namespaces: self.namespaces(
                at,
                (
                    &s.namespaces,
                    "namespaces",
                    &s.not_namespaces,
                    "notNamespaces",
                ),
            )?,
            ip_blocks: self.cidrs(
                at,
                (&s.ip_blocks, "ipBlocks", &s.not_ip_blocks, "notIpBlocks"),
            )?,
            remote_ip_blocks: self.cidrs(
                at,
                (
                    &s.remote_ip_blocks,
                    "remoteIpBlocks",
                    &s.not_remote_ip_blocks,
                    "notRemoteIpBlocks",
                ),
            )?,
        };
        if source.principals.is_empty()
            && source.namespaces.is_empty()
            && source.ip_blocks.is_empty()
            && source.remote_ip_blocks.is_empty()
        {
            return Err(Error::EmptySource {
                policy: self.key.to_owned(),
                field: at(""),
            });
        }
        Ok(source)
    }

    fn operation(&self, rule: usize, index: usize, o: &pb::Operation) -> Result<Operation, Error> {
        let at = |name| Field {
            rule,
            part: Part::To,
            index,
            name,
        };
        let op = Operation {
            hosts: self.patterns(at, (&o.hosts, "hosts", &o.not_hosts, "notHosts"), true)?,
            ports: self.ports(at, (&o.ports, "ports", &o.not_ports, "notPorts"))?,
            methods: self.patterns(
                at,
                (&o.methods, "methods", &o.not_methods, "notMethods"),
                false,
            )?,
            paths: self.paths(at, (&o.paths, "paths", &o.not_paths, "notPaths"))?,
        };
        if op.hosts.is_empty()
            && op.ports.is_empty()
            && op.methods.is_empty()
            && op.paths.is_empty()
        {
            return Err(Error::EmptyOperation {
                policy: self.key.to_owned(),
                field: at(""),
            });
        }
        Ok(op)
    }

    fn condition(
        &self,
        rule: usize,
        index: usize,
        c: &pb::Condition,
        action: Action,
    ) -> Result<Condition, Error> {
        let at = |name| Field {
            rule,
            part: Part::When,
            index,
            name,
        };
        let pair: Pair<'_> = (&c.values, "values", &c.not_values, "notValues");
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(Error::EmptyCondition {
                policy: self.key.to_owned(),
                field: at(""),
                key: c.key.clone(),
            });
        }
        let key = c.key.as_str();
        Ok(match key {
            "source.ip" => Condition::SourceIp(self.cidrs(at, pair)?),
            "remote.ip" => Condition::RemoteIp(self.cidrs(at, pair)?),
            "destination.ip" => Condition::DestinationIp(self.cidrs(at, pair)?),
            "destination.port" => Condition::DestinationPort(self.ports(at, pair)?),
            "source.namespace" => Condition::SourceNamespace(self.namespaces(at, pair)?),
            "source.principal" => Condition::SourcePrincipal(self.patterns(at, pair, false)?),
            "source.serviceAccount" => {
                Condition::SourceServiceAccount(self.service_accounts(at, pair)?)
            }
            _ if key.starts_with("request.auth.") => {
                self.values(at, pair, |_, _| Ok(()))?;
                Condition::RequestAuth {
                    has_values: !c.values.is_empty(),
                }
            }
            _ if key.starts_with("request.headers") => {
                let header = self.header_key(at("key"), key)?;
                Condition::Header(header, self.patterns(at, pair, false)?)
            }
            _ => {
                self.values(at, pair, |_, _| Ok(()))?;
                Condition::Unknown {
                    matches: action == Action::Deny,
                }
            }
        })
    }

    /// `request.headers[name]` → what to read.
    fn header_key(&self, field: Field, key: &str) -> Result<HeaderKey, Error> {
        let invalid = || Error::InvalidHeaderKey {
            policy: self.key.to_owned(),
            field,
            key: key.to_owned(),
        };
        let name = key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
            .filter(|n| !n.is_empty())
            .ok_or_else(invalid)?;
        Ok(match name.to_ascii_lowercase().as_str() {
            ":authority" | "host" => HeaderKey::Authority,
            ":method" => HeaderKey::Method,
            ":path" => HeaderKey::Path,
            _ => HeaderKey::Name(HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?),
        })
    }

    /// Compiles both lists of a pair with `f`, refusing empty strings.
    fn values<T>(
        &self,
        at: impl Fn(&'static str) -> Field,
        (pos, pos_name, neg, neg_name): Pair<'_>,
        f: impl Fn(&str, Field) -> Result<T, Error>,
    ) -> Result<Values<T>, Error> {
        let list = |values: &[String], name| -> Result<Vec<T>, Error> {
            values
                .iter()
                .map(|v| {
                    if v.is_empty() {
                        return Err(Error::EmptyValue {
                            policy: self.key.to_owned(),
                            field: at(name),
                        });
                    }
                    f(v, at(name))
                })
                .collect()
        };
        Ok(Values {
            any_of: list(pos, pos_name)?,
            none_of: list(neg, neg_name)?,
        })
    }

    fn patterns(
        &self,
        at: impl Fn(&'static str) -> Field,
        pair: Pair<'_>,
        lower: bool,
    ) -> Result<Values<Pattern>, Error> {
        // `values` has refused empty strings, the only input `Pattern::parse` rejects.
        self.values(at, pair, |v, _| {
            Ok(Pattern::parse(v, lower).unwrap_or(Pattern::Present))
        })
    }

    fn namespaces(
        &self,
        at: impl Fn(&'static str) -> Field,
        pair: Pair<'_>,
    ) -> Result<Values<Pattern>, Error> {
        self.values(at, pair, |v, field| {
            // Istio turns every `*` of a namespace into `.*`; only the leading or trailing one has a
            // meaning here.
            let stars = v.matches('*').count();
            let at_edge = v.starts_with('*') || v.ends_with('*');
            if v != "*" && (stars > 1 || (stars == 1 && !at_edge)) {
                return Err(Error::MisplacedWildcard {
                    policy: self.key.to_owned(),
                    field,
                    value: v.to_owned(),
                });
            }
            Ok(Pattern::parse(v, false).unwrap_or(Pattern::Present))
        })
    }

    fn paths(
        &self,
        at: impl Fn(&'static str) -> Field,
        pair: Pair<'_>,
    ) -> Result<Values<PathPattern>, Error> {
        self.values(at, pair, |v, field| match PathPattern::parse(v) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(Error::EmptyValue {
                policy: self.key.to_owned(),
                field,
            }),
            Err(TemplateError::NotAbsolute | TemplateError::Misplaced) => {
                Err(Error::InvalidPathTemplate {
                    policy: self.key.to_owned(),
                    field,
                    value: v.to_owned(),
                })
            }
        })
    }

    fn cidrs(
        &self,
        at: impl Fn(&'static str) -> Field,
        pair: Pair<'_>,
    ) -> Result<Values<IpNet>, Error> {
        self.values(at, pair, |v, field| {
            let v = v.trim();
            let net = if v.contains('/') {
                v.parse::<IpNet>().ok()
            } else {
                v.parse::<IpAddr>().ok().map(IpNet::from)
            };
            net.map(|n| match n.addr().to_canonical() {
                // An IPv4-mapped network compares as the IPv4 one (requests' addresses are canonical).
                IpAddr::V4(a) if n.addr().is_ipv6() && n.prefix_len() >= 96 => {
                    IpNet::new(IpAddr::V4(a), n.prefix_len() - 96).unwrap_or(n)
                }
                _ => n,
            })
            .ok_or_else(|| Error::InvalidCidr {
                policy: self.key.to_owned(),
                field,
                value: v.to_owned(),
            })
        })
    }

    fn ports(
        &self,
        at: impl Fn(&'static str) -> Field,
        pair: Pair<'_>,
    ) -> Result<Values<u16>, Error> {
        self.values(at, pair, |v, field| {
            v.parse::<u16>().map_err(|_| Error::InvalidPort {
                policy: self.key.to_owned(),
                field,
                value: v.to_owned(),
            })
        })
    }

    fn service_accounts(
        &self,
        at: impl Fn(&'static str) -> Field,
        pair: Pair<'_>,
    ) -> Result<Values<(String, String)>, Error> {
        self.values(at, pair, |v, _| {
            Ok(match v.split_once('/') {
                Some((ns, sa)) => (ns.to_owned(), sa.to_owned()),
                None => (self.namespace.to_owned(), v.to_owned()),
            })
        })
    }
}
