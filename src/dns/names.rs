//! Which mesh service a DNS name means to a client pod, and the addresses to answer with: the name as
//! asked, its Kubernetes expansions (`reviews` → `reviews.<client ns>.svc.<domain>`, `reviews.ns` →
//! `reviews.ns.svc.<domain>`, …), the name with one of the pod's search domains stripped (and that name's
//! expansions), each tried as is and then as ever wider wildcards (`*.example.com`, `*.com`), as ztunnel
//! resolves them.
//!
//! Input: the state snapshot, the client workload, a lower-case name without its trailing dot, the record
//! type (A or AAAA), the cluster domain. Output: [`Found`] (the service's addresses of that family on the
//! client's network, or its endpoints' when headless — none for a family outside the service's
//! `ipFamilies` — and the stripped name to alias when a search domain was removed), or `None`: the name is
//! not the mesh's (or its service is not visible to the client's namespace), and the query is forwarded.

use std::net::IpAddr;
use std::sync::Arc;

use crate::state::{IpFamilies, Service, State, Workload};

/// The address family a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// A.
    V4,
    /// AAAA.
    V6,
}

impl Family {
    fn admits(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// What the proxy answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The service's hostname that matched (possibly a wildcard host such as `*.example.com`).
    pub host: String,
    /// When the client's resolver had appended one of its search domains: the name without it. The
    /// answer then aliases the asked name to this one (CNAME) and gives the addresses under it, unless
    /// the match was a wildcard.
    pub alias_to: Option<String>,
    /// Addresses of the asked family, in the order to answer (shuffled by the caller). Empty: the name
    /// exists but has no address of that family (NOERROR, no answers).
    pub addrs: Vec<IpAddr>,
}

/// The lookup settings that do not change per query.
#[derive(Debug, Clone)]
pub struct Names {
    /// `svc.<cluster domain>`.
    svc_domain: String,
    /// `.svc.<cluster domain>`: the suffix of Kubernetes service hostnames, built once.
    svc_suffix: String,
    /// The cluster domain (`cluster.local`).
    domain: String,
    /// Preferred namespace among services sharing a hostname, after the client's own
    /// (`PREFERED_SERVICE_NAMESPACE`).
    preferred_namespace: Option<String>,
    /// AAAA answers allowed at all (`IPV6_ENABLED`).
    ipv6: bool,
}

/// A name to look up, and the name it came from by stripping a search domain, if any.
#[derive(Debug, PartialEq, Eq)]
struct Alias {
    name: String,
    stripped: Option<String>,
}

impl Names {
    /// Settings for `cluster_domain`.
    pub fn new(cluster_domain: &str, preferred_namespace: Option<String>, ipv6: bool) -> Names {
        let domain = cluster_domain.trim_end_matches('.').to_ascii_lowercase();
        Names {
            svc_domain: format!("svc.{domain}"),
            svc_suffix: format!(".svc.{domain}"),
            domain,
            preferred_namespace,
            ipv6,
        }
    }

    /// The search domains of a pod in `namespace`, as Kubernetes writes them into its resolv.conf.
    pub fn search_domains(&self, namespace: &str) -> [String; 3] {
        [
            format!("{namespace}.{}", self.svc_domain),
            self.svc_domain.clone(),
            self.domain.clone(),
        ]
    }

    /// The mesh's answer for `name` (lower case, no trailing dot) asked by `client`, if it is a mesh name.
    pub fn lookup(
        &self,
        state: &State,
        client: &Workload,
        name: &str,
        family: Family,
    ) -> Option<Found> {
        for alias in self.aliases(&client.namespace, name) {
            for candidate in wildcards(&alias.name) {
                let Some(svc) = self.best(state, &candidate, &client.namespace) else {
                    continue;
                };
                let wildcard = candidate.starts_with("*.");
                return Some(Found {
                    alias_to: alias.stripped.filter(|_| !wildcard),
                    addrs: self.addresses(state, client, svc, family),
                    host: candidate,
                });
            }
        }
        None
    }

    /// The service named `host` the client should get: services without a VIP only when they are
    /// Kubernetes headless services (the rest are forwarded, as DNS outside the mesh knows them); the
    /// client's namespace first, then the preferred namespace, then a canonical one, then any.
    fn best<'s>(&self, state: &'s State, host: &str, client_ns: &str) -> Option<&'s Arc<Service>> {
        let usable = |s: &&Arc<Service>| {
            (!s.vips.is_empty() || s.hostname.ends_with(&self.svc_suffix))
                && s.visible_to(client_ns)
        };
        let all = || state.services_by_host(host).filter(usable);
        all()
            .find(|s| s.namespace == client_ns)
            .or_else(|| {
                let preferred = self.preferred_namespace.as_deref()?;
                all().find(|s| s.namespace == preferred)
            })
            .or_else(|| all().find(|s| s.canonical))
            .or_else(|| all().next())
    }

    fn addresses(
        &self,
        state: &State,
        client: &Workload,
        svc: &Service,
        family: Family,
    ) -> Vec<IpAddr> {
        let allowed = match (svc.ip_families, family) {
            (_, Family::V6) if !self.ipv6 => false,
            (IpFamilies::V4, Family::V6) | (IpFamilies::V6, Family::V4) => false,
            _ => true,
        };
        if !allowed {
            return Vec::new();
        }
        if svc.vips.is_empty() {
            // Headless: one address of the family per endpoint.
            return state
                .endpoints(svc)
                .filter_map(|(w, _)| w.ips.iter().copied().find(|ip| family.admits(ip)))
                .collect();
        }
        svc.vips
            .iter()
            .filter(|(network, ip)| *network == client.network && family.admits(ip))
            .map(|(_, ip)| *ip)
            .collect()
    }

    /// The names to try, in order, without repeats.
    fn aliases(&self, client_ns: &str, name: &str) -> Vec<Alias> {
        let mut out: Vec<Alias> = Vec::new();
        let mut add = |name: String, stripped: Option<&str>| {
            if !out.iter().any(|a| a.name == name) {
                out.push(Alias {
                    name,
                    stripped: stripped.map(str::to_string),
                });
            }
        };
        add(name.to_string(), None);
        for fqdn in self.kube_fqdns(client_ns, name) {
            add(fqdn, None);
        }
        for search in self.search_domains(client_ns) {
            let Some(stripped) = name
                .strip_suffix(search.as_str())
                .and_then(|s| s.strip_suffix('.'))
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            add(stripped.to_string(), Some(stripped));
            for fqdn in self.kube_fqdns(client_ns, stripped) {
                add(fqdn, Some(stripped));
            }
        }
        out
    }

    /// The Kubernetes names `name` may be short for: a service (`svc`, `svc.ns`, `svc.ns.svc`) or a pod
    /// host under a subdomain (`pod.sub`, `pod.sub.ns`, `pod.sub.ns.svc`).
    fn kube_fqdns(&self, client_ns: &str, name: &str) -> Vec<String> {
        let labels = name.split('.').count();
        let ends_svc = name.ends_with(".svc");
        match labels {
            1 => vec![format!("{name}.{client_ns}.{}", self.svc_domain)],
            2 => vec![
                format!("{name}.{}", self.svc_domain),
                format!("{name}.{client_ns}.{}", self.svc_domain),
            ],
            3 if ends_svc => vec![
                format!("{name}.{}", self.domain),
                format!("{name}.{}", self.svc_domain),
            ],
            3 => vec![format!("{name}.{}", self.svc_domain)],
            4 if ends_svc => vec![format!("{name}.{}", self.domain)],
            _ => Vec::new(),
        }
    }
}

/// `name`, then each wildcard above it: `a.b.c` → `a.b.c`, `*.b.c`, `*.c`.
fn wildcards(name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        out.push(format!("*.{parent}"));
        rest = parent;
    }
    out
}

#[cfg(test)]
mod tests;
