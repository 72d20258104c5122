//! A pod's DNS listeners: reading queries (UDP datagrams, TCP length-prefixed messages), answering each
//! from the mesh or through the upstreams, and writing the answer back, within the module's bounds.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

use super::names::Family;
use super::upstream::{self, Transport};
use super::{PodDns, MAX_IN_FLIGHT, MAX_QUERY_BYTES, MAX_TCP_CONNECTIONS, TTL_SECONDS};
use crate::config::DnsBind;
use crate::metrics::DnsLabels;
use crate::netns::InpodNetns;
use crate::socket::{self, SocketOpts};

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The UDP payload offered in our own answers' EDNS record (the DNS flag day's safe size).
const EDNS_PAYLOAD: u16 = 1232;

/// A pod's bound DNS sockets.
pub struct Sockets {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

impl Sockets {
    /// Binds UDP and TCP at `bind` inside `netns` (or the current namespace). `localhost` means
    /// 127.0.0.1 and, when `ipv6` and the namespace has ::1, ::1 too.
    pub fn bind(
        bind: DnsBind,
        ipv6: bool,
        netns: Option<&InpodNetns>,
        reuse_port: bool,
    ) -> io::Result<Sockets> {
        let opts = SocketOpts {
            mark: None,
            transparent: false,
            reuse_port,
        };
        let addrs: Vec<SocketAddr> = match bind {
            DnsBind::Addr(a) => vec![a],
            DnsBind::Localhost(port) => {
                let mut v = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))];
                if ipv6 {
                    v.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
                }
                v
            }
        };
        let mut s = Sockets {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for addr in addrs {
            let optional = matches!(bind, DnsBind::Localhost(_)) && addr.is_ipv6();
            let bound = socket::udp_bind_in(netns, addr, opts).and_then(|u| {
                let t = socket::listen_in(netns, addr, opts)?;
                Ok((u, t))
            });
            match bound {
                Ok((u, t)) => {
                    s.udp.push(u);
                    s.tcp.push(t);
                }
                // A pod without IPv6 on its loopback: IPv4 only, as ztunnel does.
                Err(e) if optional => {
                    tracing::debug!(%addr, error = %e, "no IPv6 loopback; DNS on IPv4 only")
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("binding DNS at {addr}: {e}"),
                    ))
                }
            }
        }
        Ok(s)
    }

    /// Where the sockets listen (UDP and TCP share the addresses).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|u| u.local_addr().ok())
            .collect()
    }
}

/// Serves `pod`'s DNS on `sockets` until `shutdown` turns true.
pub async fn serve(pod: PodDns, sockets: Sockets, mut shutdown: watch::Receiver<bool>) {
    let pod = Arc::new(pod);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for udp in sockets.udp {
        tasks.spawn(serve_udp(pod.clone(), Arc::new(udp), in_flight.clone()));
    }
    let tcp_conns = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    for tcp in sockets.tcp {
        tasks.spawn(serve_tcp(
            pod.clone(),
            tcp,
            in_flight.clone(),
            tcp_conns.clone(),
        ));
    }
    let _ = shutdown.wait_for(|s| *s).await;
    // Dropping the set aborts the loops and closes the sockets; queries in flight end with them.
    tasks.abort_all();
}

async fn serve_udp(pod: Arc<PodDns>, sock: Arc<UdpSocket>, in_flight: Arc<Semaphore>) {
    // One byte more than accepted, so an oversized datagram is seen as such rather than cut.
    let mut buf = vec![0u8; MAX_QUERY_BYTES + 1];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Answered here when the answer needs no waiting (mesh names, refusals); a task only to forward.
        let (msg, labels) = match pod.local(&buf[..n], Transport::Udp) {
            Local::Drop => continue,
            Local::Answer(answer) => {
                if let Err(e) = sock.send_to(&answer, peer).await {
                    tracing::debug!(%peer, error = %e, "sending a DNS answer failed");
                }
                continue;
            }
            Local::Forward { msg, labels } => (msg, labels),
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "DNS query dropped: too many being forwarded");
            continue;
        };
        let query = buf[..n].to_vec();
        let (pod, sock) = (pod.clone(), sock.clone());
        tokio::spawn(async move {
            let answer = pod.forward(&query, &msg, &labels, Transport::Udp).await;
            if let Err(e) = sock.send_to(&answer, peer).await {
                tracing::debug!(%peer, error = %e, "sending a DNS answer failed");
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(
    pod: Arc<PodDns>,
    listener: TcpListener,
    in_flight: Arc<Semaphore>,
    conns: Arc<Semaphore>,
) {
    loop {
        let Ok(permit) = conns.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (pod, in_flight) = (pod.clone(), in_flight.clone());
        tokio::spawn(async move {
            if let Err(e) = tcp_client(&pod, stream, &in_flight).await {
                tracing::debug!(%peer, error = %e, "DNS TCP client closed");
            }
            drop(permit);
        });
    }
}

/// Answers one TCP client's queries in turn until it closes, idles or sends something too large.
async fn tcp_client(pod: &PodDns, mut stream: TcpStream, in_flight: &Semaphore) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r? as usize,
        };
        if !(12..=MAX_QUERY_BYTES).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("query of {len} bytes refused"),
            ));
        }
        let mut query = vec![0; len];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query not sent in time"))??;
        let _permit = in_flight.acquire().await;
        let Some(answer) = pod.answer(&query, Transport::Tcp).await else {
            continue;
        };
        let Ok(n) = u16::try_from(answer.len()) else {
            continue;
        };
        let mut out = Vec::with_capacity(answer.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&answer);
        stream.write_all(&out).await?;
    }
}

/// What [`PodDns::local`] decided.
enum Local {
    /// Nothing to send back.
    Drop,
    /// This answer.
    Answer(Vec<u8>),
    /// Not a mesh name (or not an A/AAAA question): ask the upstreams.
    Forward {
        msg: Box<Message>,
        labels: DnsLabels,
    },
}

impl PodDns {
    /// The answer to `query` (wire bytes), or `None` when it deserves none (shorter than a header, or
    /// itself a response).
    pub async fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.local(query, transport) {
            Local::Drop => None,
            Local::Answer(a) => Some(a),
            Local::Forward { msg, labels } => {
                Some(self.forward(query, &msg, &labels, transport).await)
            }
        }
    }

    /// The answer given without asking the upstreams (refusals and mesh names); `None` when the query
    /// would be dropped or forwarded. For the fuzz target.
    #[doc(hidden)]
    pub fn answer_here(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.local(query, transport) {
            Local::Answer(a) => Some(a),
            Local::Drop | Local::Forward { .. } => None,
        }
    }

    /// Everything but forwarding, without waiting: refusals, and mesh names from the state.
    fn local(&self, query: &[u8], transport: Transport) -> Local {
        if query.len() < 12 || query[2] & 0x80 != 0 || query.len() > MAX_QUERY_BYTES {
            return Local::Drop;
        }
        let protocol = match transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "unparsable DNS query");
                return Local::Answer(header_only(query, ResponseCode::FormErr));
            }
        };
        if msg.message_type() != MessageType::Query || msg.op_code() != OpCode::Query {
            return Local::Answer(header_only(query, ResponseCode::NotImp));
        }
        let [question] = msg.queries() else {
            return Local::Answer(header_only(query, ResponseCode::FormErr));
        };
        let qtype = question.query_type();
        let r = &self.resolver;
        let state = r.state.load();
        let Some(client) = state.workload_by_info(&self.workload) else {
            tracing::debug!(workload = ?self.workload, "DNS query from a pod not in the state");
            r.metrics
                .dns()
                .answered(&DnsLabels::new(&qtype.to_string(), protocol, None));
            return Local::Answer(reply(&msg, ResponseCode::ServFail, Vec::new(), transport));
        };
        let labels = DnsLabels::new(&qtype.to_string(), protocol, Some(client));
        let family = match (qtype, question.query_class()) {
            (RecordType::A, DNSClass::IN) => Some(Family::V4),
            (RecordType::AAAA, DNSClass::IN) => Some(Family::V6),
            _ => None,
        };
        if let Some(family) = family {
            let asked = question.name();
            let key = host_key(asked);
            if let Some(found) = r.names.lookup(&state, client, &key, family) {
                r.metrics.dns().answered(&labels);
                tracing::debug!(name = %asked, host = %found.host, addrs = found.addrs.len(), "DNS answered from the mesh");
                let records = records(asked, found);
                return Local::Answer(reply(&msg, ResponseCode::NoError, records, transport));
            }
        }
        Local::Forward {
            msg: Box::new(msg),
            labels,
        }
    }

    /// The upstreams' answer to `query`, or SERVFAIL.
    async fn forward(
        &self,
        query: &[u8],
        msg: &Message,
        labels: &DnsLabels,
        transport: Transport,
    ) -> Vec<u8> {
        let r = &self.resolver;
        let started = Instant::now();
        let forwarded = upstream::forward(
            &r.upstreams,
            self.netns.as_deref(),
            SocketOpts {
                mark: r.mark,
                transparent: false,
                reuse_port: false,
            },
            query,
            transport,
        )
        .await;
        r.metrics
            .dns()
            .forwarded(labels, started.elapsed(), forwarded.is_ok());
        forwarded.unwrap_or_else(|e| {
            tracing::debug!(name = ?msg.queries().first().map(|q| q.name()), error = %e, "DNS forwarding failed");
            reply(msg, ResponseCode::ServFail, Vec::new(), transport)
        })
    }
}

/// The lookup key of a name: lower case, without the trailing dot.
fn host_key(name: &Name) -> String {
    let mut s = name.to_lowercase().to_string();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// The answer records: addresses under the asked name, or a CNAME to the stripped name and the
/// addresses under that.
fn records(asked: &Name, found: super::names::Found) -> Vec<Record> {
    let mut out = Vec::with_capacity(found.addrs.len() + 1);
    let mut owner = asked.clone();
    if let Some(to) = found
        .alias_to
        .and_then(|t| Name::from_ascii(&t).ok())
        .map(|mut n| {
            n.set_fqdn(true);
            n
        })
    {
        out.push(Record::from_rdata(
            asked.clone(),
            TTL_SECONDS,
            RData::CNAME(CNAME(to.clone())),
        ));
        owner = to;
    }
    let mut addrs = found.addrs;
    addrs.shuffle(&mut rand::rng());
    for ip in addrs {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        out.push(Record::from_rdata(owner.clone(), TTL_SECONDS, rdata));
    }
    out
}

/// A response to `query` with `answers`: authoritative when it carries our own records, recursion
/// available (the proxy forwards), EDNS when the query had it; over UDP, cut to the client's payload
/// size with the TC bit set when it does not fit (the client then asks again over TCP).
fn reply(
    query: &Message,
    code: ResponseCode,
    answers: Vec<Record>,
    transport: Transport,
) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(code == ResponseCode::NoError)
        .set_response_code(code);
    for q in query.queries() {
        m.add_query(Query::clone(q));
    }
    if query.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    m.insert_answers(answers);
    let limit = match transport {
        Transport::Udp => usize::from(query.max_payload()).min(usize::from(EDNS_PAYLOAD).max(512)),
        Transport::Tcp => usize::from(u16::MAX),
    };
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        _ => {
            m.take_answers();
            m.set_truncated(true);
            m.to_vec()
                .unwrap_or_else(|_| header_only_of(query.id(), code))
        }
    }
}

/// A bare response header for a query we cannot (or will not) parse: its id, its opcode, `code`.
fn header_only(query: &[u8], code: ResponseCode) -> Vec<u8> {
    let mut h = header_only_of(u16::from_be_bytes([query[0], query[1]]), code);
    // Keep the opcode and RD bits of the query.
    h[2] |= query[2] & 0x79;
    h
}

fn header_only_of(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[..2].copy_from_slice(&id.to_be_bytes());
    h[2] = 0x80;
    h[3] = 0x80 | (u16::from(code) & 0x0F) as u8;
    h
}

#[cfg(test)]
mod tests;
