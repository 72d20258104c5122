//! Resolving the hostnames of workloads that have no address (a ServiceEntry with `resolution: DNS`:
//! istiod sends its endpoints as workloads named by hostname), on demand when a connection is routed to
//! one, as ztunnel does; answers are cached for their TTL.
//!
//! Input: a hostname, the address family the client used, the upstreams of [`super::upstream`]. Output:
//! the host's addresses of that family (A or AAAA, CNAMEs followed by the upstream), or why not. Cache:
//! at most [`MAX_ENTRIES`] names, each kept for its answer's smallest TTL, between [`MIN_TTL`] and
//! [`MAX_TTL`]; when full, expired entries go first, then the entry closest to expiring.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use parking_lot::Mutex;

use super::upstream::{self, Transport, Upstreams};
use crate::socket::SocketOpts;

/// Names cached at most.
pub const MAX_ENTRIES: usize = 4096;
/// Shortest time an answer is kept (a TTL of 0 would mean a query per connection).
pub const MIN_TTL: Duration = Duration::from_secs(5);
/// Longest time an answer is kept.
pub const MAX_TTL: Duration = Duration::from_secs(300);

/// Why a hostname could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is not a DNS name.
    #[error("{0:?} is not a valid DNS name")]
    BadName(String),
    /// No upstream answered.
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    /// The answer could not be read.
    #[error("unreadable DNS answer: {0}")]
    BadAnswer(String),
    /// The upstream answered with an error code.
    #[error("DNS answered {0}")]
    Refused(ResponseCode),
    /// No address of the family asked for.
    #[error("no {0} address")]
    NoAddress(&'static str),
}

struct Entry {
    addrs: Vec<IpAddr>,
    expires: Instant,
}

/// The on-demand lookup cache (one per process).
#[derive(Default)]
pub struct Lookups {
    cache: Mutex<HashMap<(String, bool), Entry>>,
}

impl Lookups {
    /// The addresses of `host` of the family of `like` (IPv4 or IPv6), from the cache or the upstreams.
    pub async fn resolve(
        &self,
        upstreams: &Upstreams,
        opts: SocketOpts,
        host: &str,
        like: IpAddr,
    ) -> Result<Vec<IpAddr>, Error> {
        let v6 = like.is_ipv6();
        let key = (host.trim_end_matches('.').to_ascii_lowercase(), v6);
        if let Some(e) = self.cache.lock().get(&key) {
            if e.expires > Instant::now() {
                return Ok(e.addrs.clone());
            }
        }
        let mut name = Name::from_ascii(&key.0).map_err(|_| Error::BadName(host.to_string()))?;
        name.set_fqdn(true);
        let rtype = if v6 { RecordType::AAAA } else { RecordType::A };
        let mut q = Message::new();
        q.set_id(rand::random())
            .set_recursion_desired(true)
            .add_query(Query::query(name, rtype));
        let query = q.to_vec().map_err(|e| Error::BadName(e.to_string()))?;
        let mut bytes = upstream::forward(upstreams, None, opts, &query, Transport::Udp).await?;
        let mut answer = Message::from_vec(&bytes).map_err(|e| Error::BadAnswer(e.to_string()))?;
        if answer.truncated() {
            bytes = upstream::forward(upstreams, None, opts, &query, Transport::Tcp).await?;
            answer = Message::from_vec(&bytes).map_err(|e| Error::BadAnswer(e.to_string()))?;
        }
        if answer.response_code() != ResponseCode::NoError {
            return Err(Error::Refused(answer.response_code()));
        }
        let mut ttl = MAX_TTL;
        let addrs: Vec<IpAddr> = answer
            .answers()
            .iter()
            .filter_map(|r| {
                let ip = match r.data() {
                    RData::A(a) if !v6 => IpAddr::V4(a.0),
                    RData::AAAA(a) if v6 => IpAddr::V6(a.0),
                    _ => return None,
                };
                ttl = ttl.min(Duration::from_secs(r.ttl().into()));
                Some(ip)
            })
            .collect();
        if addrs.is_empty() {
            return Err(Error::NoAddress(if v6 { "IPv6" } else { "IPv4" }));
        }
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_ENTRIES && !cache.contains_key(&key) {
            let now = Instant::now();
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= MAX_ENTRIES {
                if let Some(k) = cache
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone())
                {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            Entry {
                addrs: addrs.clone(),
                expires: Instant::now() + ttl.max(MIN_TTL),
            },
        );
        Ok(addrs)
    }

    /// Names cached now (tests).
    pub fn len(&self) -> usize {
        self.cache.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use hickory_proto::op::MessageType;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::Record;

    use super::*;

    /// A resolver on loopback answering `api.example.org` with two addresses (TTL `ttl`), NXDOMAIN for the
    /// rest; counts the queries.
    async fn resolver(ttl: u32) -> (Upstreams, Arc<AtomicUsize>) {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            loop {
                let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
                seen.fetch_add(1, Ordering::Relaxed);
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut m = Message::new();
                m.set_id(q.id()).set_message_type(MessageType::Response);
                let question = q.queries()[0].clone();
                if question.name().to_ascii() == "api.example.org." {
                    for ip in ["192.0.2.10", "192.0.2.11"] {
                        m.add_answer(Record::from_rdata(
                            question.name().clone(),
                            ttl,
                            RData::A(A(ip.parse().unwrap())),
                        ));
                    }
                } else {
                    m.set_response_code(ResponseCode::NXDomain);
                }
                m.add_query(question);
                sock.send_to(&m.to_vec().unwrap(), peer).await.unwrap();
            }
        });
        (
            Upstreams::parse(&format!("nameserver {addr}\noptions timeout:2 attempts:1")),
            count,
        )
    }

    const V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

    #[tokio::test]
    async fn a_hostname_resolves_once_per_ttl_and_unknown_names_fail() {
        let (up, asked) = resolver(60).await;
        let l = Lookups::default();
        let opts = SocketOpts::default();
        let mut got = l.resolve(&up, opts, "API.example.org.", V4).await.unwrap();
        got.sort();
        assert_eq!(
            got,
            [
                "192.0.2.10".parse::<IpAddr>().unwrap(),
                "192.0.2.11".parse().unwrap()
            ]
        );
        l.resolve(&up, opts, "api.example.org", V4).await.unwrap();
        assert_eq!(
            asked.load(Ordering::Relaxed),
            1,
            "the second came from the cache"
        );
        let err = l
            .resolve(&up, opts, "nope.example.org", V4)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Refused(ResponseCode::NXDomain)),
            "{err}"
        );
        let v6 = l
            .resolve(&up, opts, "api.example.org", "::1".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(v6, Error::Refused(_) | Error::NoAddress(_)),
            "{v6}"
        );
        let too_long = format!("{}.example.org", "a".repeat(70));
        assert!(matches!(
            l.resolve(&up, opts, &too_long, V4).await,
            Err(Error::BadName(_))
        ));
    }

    #[tokio::test]
    async fn a_zero_ttl_is_still_cached_for_the_minimum() {
        let (up, asked) = resolver(0).await;
        let l = Lookups::default();
        for _ in 0..3 {
            l.resolve(&up, SocketOpts::default(), "api.example.org", V4)
                .await
                .unwrap();
        }
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        assert_eq!(l.len(), 1);
    }
}
