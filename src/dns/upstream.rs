//! Forwarding what the mesh does not answer to the resolvers the node proxy's own resolv.conf names (as
//! ztunnel does; in a cluster that is kube-dns, the same resolver the pods' resolv.conf names).
//!
//! Input: [`Upstreams`] read once from a resolv.conf (`nameserver`, `options timeout:` and `attempts:`),
//! a query's wire bytes, the pod's network namespace and the packet mark (the query leaves from inside the
//! pod, marked so the capture rules let it through). Output: the first upstream's answer, byte for byte,
//! with the client's message id; a UDP answer with the TC bit is passed on as is, so the client retries
//! over TCP (and that TCP query is forwarded over TCP). Each try is a fresh socket on a random port with a
//! random message id; a reply whose id or question does not match is ignored. A resolver that does not
//! answer within the timeout is tried next, `attempts` rounds; then the query fails (the caller answers
//! SERVFAIL).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::InpodNetns;
use crate::socket::SocketOpts;

/// resolv.conf's defaults (resolv.conf(5)).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_ATTEMPTS: u32 = 2;
/// resolv.conf(5) caps: at most 3 name servers are used, timeout ≤ 30 s, attempts ≤ 5.
const MAX_SERVERS: usize = 3;
const MAX_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ATTEMPTS: u32 = 5;
/// Largest UDP answer read (EDNS payloads above this are not offered by real resolvers).
const MAX_UDP_ANSWER: usize = 65_535;

/// Where unanswered queries go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstreams {
    /// Name servers, port 53 unless written otherwise (`nameserver` lines, at most 3).
    pub servers: Vec<SocketAddr>,
    /// Time to wait for one server's answer.
    pub timeout: Duration,
    /// Rounds over the servers.
    pub attempts: u32,
}

impl Upstreams {
    /// Reads `path`. A missing or unreadable file gives no servers (queries for names outside the mesh
    /// then fail with SERVFAIL), and says so.
    pub fn read(path: &Path) -> Upstreams {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let u = Upstreams::parse(&text);
                if u.servers.is_empty() {
                    tracing::warn!(path = %path.display(), "no nameserver in resolv.conf: DNS queries for names outside the mesh will fail");
                }
                u
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read resolv.conf: DNS queries for names outside the mesh will fail");
                Upstreams::parse("")
            }
        }
    }

    /// Parses resolv.conf text; lines it does not know are ignored, as the C library ignores them.
    pub fn parse(text: &str) -> Upstreams {
        let mut u = Upstreams {
            servers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
        };
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(addr) = words.next().and_then(parse_server) {
                        if u.servers.len() < MAX_SERVERS {
                            u.servers.push(addr);
                        }
                    }
                }
                Some("options") => {
                    for opt in words {
                        if let Some(v) = opt.strip_prefix("timeout:").and_then(|v| v.parse().ok()) {
                            u.timeout =
                                Duration::from_secs(v).clamp(Duration::from_secs(1), MAX_TIMEOUT);
                        } else if let Some(v) = opt
                            .strip_prefix("attempts:")
                            .and_then(|v| v.parse::<u32>().ok())
                        {
                            u.attempts = v.clamp(1, MAX_ATTEMPTS);
                        }
                    }
                }
                _ => {}
            }
        }
        u
    }
}

/// `1.2.3.4`, `fd00::1`, or with a port (`1.2.3.4:5353`, `[fd00::1]:5353`; not in resolv.conf(5), but
/// handy in tests and accepted by musl).
fn parse_server(s: &str) -> Option<SocketAddr> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    s.parse().ok()
}

/// Why a query could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No name server configured.
    #[error("no upstream name server configured")]
    NoServers,
    /// Every server, every round, failed or stayed silent.
    #[error("no answer from {servers:?} ({attempts} attempts): {last}")]
    NoAnswer {
        /// The servers tried.
        servers: Vec<SocketAddr>,
        /// Rounds.
        attempts: u32,
        /// The last failure.
        last: io::Error,
    },
}

/// How the client asked, and so how the query is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP (answers may come back truncated).
    Udp,
    /// TCP (length-prefixed; for large answers).
    Tcp,
}

/// Sends `query` (a whole DNS message, at least its 12-byte header) to the upstreams in turn and returns
/// the first matching answer, with `query`'s own id.
pub async fn forward(
    upstreams: &Upstreams,
    netns: Option<&InpodNetns>,
    opts: SocketOpts,
    query: &[u8],
    transport: Transport,
) -> Result<Vec<u8>, Error> {
    if upstreams.servers.is_empty() {
        return Err(Error::NoServers);
    }
    let client_id = [query[0], query[1]];
    let mut last = io::Error::other("not tried");
    for _ in 0..upstreams.attempts {
        for &server in &upstreams.servers {
            let id: [u8; 2] = rand::random();
            let mut msg = query.to_vec();
            msg[..2].copy_from_slice(&id);
            let tried = match transport {
                Transport::Udp => {
                    tokio::time::timeout(upstreams.timeout, udp(netns, opts, server, &msg)).await
                }
                Transport::Tcp => {
                    tokio::time::timeout(upstreams.timeout, tcp(netns, opts, server, &msg)).await
                }
            };
            match tried {
                Ok(Ok(mut answer)) => {
                    answer[..2].copy_from_slice(&client_id);
                    return Ok(answer);
                }
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = io::Error::new(io::ErrorKind::TimedOut, format!("{server} timed out"))
                }
            }
        }
    }
    Err(Error::NoAnswer {
        servers: upstreams.servers.clone(),
        attempts: upstreams.attempts,
        last,
    })
}

/// Whether `answer` answers `query`: same id, a response, and the same question section bytes (name
/// compared without case, as resolvers may echo it in another case).
fn answers(query: &[u8], answer: &[u8]) -> bool {
    if answer.len() < 12 || answer[..2] != query[..2] || answer[2] & 0x80 == 0 {
        return false;
    }
    // The question: from byte 12 to the end of the first question (name, type, class).
    let Some(end) = question_end(query) else {
        return true; // no question to compare (the caller checked the query parses; keep the id check)
    };
    answer.len() >= end && answer[12..end].eq_ignore_ascii_case(&query[12..end])
}

/// The offset just past the first question, if the query has one and it is uncompressed (as queries are).
fn question_end(msg: &[u8]) -> Option<usize> {
    if u16::from_be_bytes([msg[4], msg[5]]) == 0 {
        return None;
    }
    let mut i = 12;
    loop {
        let len = *msg.get(i)? as usize;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        i += 1 + len;
    }
    let end = i + 1 + 4;
    (end <= msg.len()).then_some(end)
}

async fn udp(
    netns: Option<&InpodNetns>,
    opts: SocketOpts,
    server: SocketAddr,
    msg: &[u8],
) -> io::Result<Vec<u8>> {
    let sock = crate::socket::udp_connected(netns, server, opts)?;
    sock.send(msg).await?;
    let mut buf = vec![0; MAX_UDP_ANSWER];
    loop {
        let n = sock.recv(&mut buf).await?;
        if answers(msg, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
        tracing::debug!(%server, "ignored a DNS reply that does not match the query");
    }
}

async fn tcp(
    netns: Option<&InpodNetns>,
    opts: SocketOpts,
    server: SocketAddr,
    msg: &[u8],
) -> io::Result<Vec<u8>> {
    let keepalive = crate::config::Keepalive {
        enabled: false,
        time: Duration::ZERO,
        interval: Duration::ZERO,
        retries: 0,
        user_timeout: false,
    };
    // The caller's timeout bounds the whole exchange; this one only the connect.
    let mut stream =
        crate::socket::connect(netns, server, None, opts, &keepalive, MAX_TIMEOUT).await?;
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("query too large"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await?;
    let len = stream.read_u16().await? as usize;
    let mut answer = vec![0; len];
    stream.read_exact(&mut answer).await?;
    if !answers(msg, &answer) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the TCP answer does not match the query",
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_servers_timeout_and_attempts_within_the_c_librarys_bounds() {
        let u = Upstreams::parse(
            "# kube\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
             nameserver fd00::a ; v6\nnameserver 127.0.0.1:5353\nnameserver 10.0.0.4\nnameserver bogus\n\
             options ndots:5 timeout:99 attempts:0\n",
        );
        assert_eq!(
            u.servers,
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[fd00::a]:53".parse().unwrap(),
                "127.0.0.1:5353".parse().unwrap()
            ]
        );
        assert_eq!(u.timeout, MAX_TIMEOUT);
        assert_eq!(u.attempts, 1);
        let d = Upstreams::parse("");
        assert!(d.servers.is_empty());
        assert_eq!((d.timeout, d.attempts), (DEFAULT_TIMEOUT, DEFAULT_ATTEMPTS));
    }

    #[test]
    fn a_reply_must_carry_the_id_and_the_question_of_the_query() {
        // id 0x1234, RD, one question: a.b A IN.
        let q = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 1, b'b', 0, 0, 1, 0, 1,
        ];
        let mut r = q.to_vec();
        r[2] |= 0x80;
        assert!(answers(&q, &r));
        r[13] = b'A';
        assert!(answers(&q, &r), "case may differ");
        r[13] = b'x';
        assert!(!answers(&q, &r), "another name");
        let mut r2 = q.to_vec();
        r2[2] |= 0x80;
        r2[1] = 0x35;
        assert!(!answers(&q, &r2), "another id");
        assert!(!answers(&q, &q), "a query is not an answer");
        assert!(!answers(&q, &r2[..5]), "too short");
    }
}
