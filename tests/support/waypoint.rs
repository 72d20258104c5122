//! Fixtures for waypoint routing: a fake waypoint (an HBONE terminator with its own workload certificate
//! that records what each CONNECT asked for and who asked, then echoes), an echo application that counts
//! its connections, a reader of PROXY protocol v2 headers written independently of the proxy's encoder,
//! and clients that connect from a chosen source address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshnode::identity::{CertSource, Identity, WorkloadCert};
use meshnode::tls::TlsMaterial;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// One CONNECT the fake waypoint received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Its `:authority`.
    pub authority: String,
    /// The identity in the client's certificate.
    pub peer: Identity,
    /// Its `forwarded` header, if any.
    pub forwarded: Option<String>,
}

/// A fake waypoint listening on `addr`.
pub struct FakeWaypoint {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeWaypoint {
    /// Every CONNECT so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }
}

impl Drop for FakeWaypoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a fake waypoint on `addr` presenting a certificate for `id` from `ca`. Each CONNECT is recorded
/// before it is answered 200; the stream then gets `waypoint=<authority>\n` followed by an echo of what
/// it carries, and ends when the client's side does.
pub async fn fake_waypoint(ca: &dyn CertSource, id: &Identity, addr: SocketAddr) -> FakeWaypoint {
    let cert = ca.fetch(id).await.unwrap();
    let tls = TlsMaterial::new(Arc::new(cert)).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let listener = TcpListener::bind(addr).await.unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Some(peer) = meshnode::tls::peer_identity(tls.get_ref().1.peer_certificates())
                else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let authority = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    let forwarded = req
                        .headers()
                        .get("forwarded")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    record.lock().push(Seen {
                        authority: authority.clone(),
                        peer: peer.clone(),
                        forwarded,
                    });
                    let ok = http::Response::builder().status(200).body(()).unwrap();
                    let Ok(send) = respond.send_response(ok, false) else {
                        continue;
                    };
                    tokio::spawn(async move {
                        // The "application" behind the waypoint: greeting, then echo, over an in-memory pipe.
                        let (mine, theirs) = tokio::io::duplex(64 * 1024);
                        tokio::spawn(async move {
                            let (mut r, mut w) = tokio::io::split(theirs);
                            let _ = w
                                .write_all(format!("waypoint={authority}\n").as_bytes())
                                .await;
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        });
                        let (mut r, mut w) = tokio::io::split(mine);
                        let (mut send, mut recv) = (send, req.into_body());
                        let _ = meshnode::hbone::copy::bidirectional(
                            &mut r, &mut w, &mut send, &mut recv,
                        )
                        .await;
                    });
                }
            });
        }
    });
    FakeWaypoint { addr, seen, task }
}

/// [`super::roundtrip`] from the source address `src`.
pub async fn roundtrip_from(src: IpAddr, dst: SocketAddr, msg: &[u8]) -> std::io::Result<String> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    let mut s = sock.connect(dst).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A raw HBONE client like [`super::hbone_client`], connecting from `src`; also returns the address it
/// connected from.
pub async fn hbone_client_from(
    cert: WorkloadCert,
    expected: Identity,
    src: IpAddr,
    dst: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, SocketAddr) {
    super::hbone_client_at(cert, expected, Some(src), dst)
        .await
        .unwrap()
}

/// Sends a CONNECT for `authority` on `send`, expects 200, writes `msg`, half-closes, and returns what
/// came back.
pub async fn connect_roundtrip(
    send: &h2::client::SendRequest<Bytes>,
    authority: &str,
    msg: &[u8],
) -> String {
    let mut s = send.clone().ready().await.unwrap();
    let (resp, mut body) = s.send_request(super::connect(authority), false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200, "CONNECT {authority}");
    body.send_data(Bytes::copy_from_slice(msg), true).unwrap();
    let mut recv = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), recv.data())
        .await
        .unwrap()
    {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A PROXY protocol v2 header as read by [`proxy_v2_app`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// TLVs in order: (type, value).
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// What a [`proxy_v2_app`] saw on one connection: the header (or why none), and the bytes after it.
#[derive(Debug, Clone)]
pub struct ProxiedConnection {
    pub header: Result<ProxyHeader, String>,
    pub payload: Vec<u8>,
}

/// An application that expects a PROXY v2 header on every connection (as a waypoint with
/// `applicationTunnel: {protocol: PROXY}` does). Binds `addr`; for each connection it reads the header,
/// answers `proxied\n` if it parsed, reads the rest until EOF, and records both.
pub async fn proxy_v2_app(addr: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<ProxiedConnection>>>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let bound = l.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<ProxiedConnection>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let header = read_proxy_v2(&mut s).await;
                if header.is_ok() {
                    let _ = s.write_all(b"proxied\n").await;
                }
                let mut payload = Vec::new();
                let _ = s.read_to_end(&mut payload).await;
                record.lock().push(ProxiedConnection { header, payload });
                let _ = s.shutdown().await;
            });
        }
    });
    (bound, seen)
}

/// Reads one PROXY v2 header (HAProxy's proxy-protocol.txt, section 2.2) for TCP over IPv4 or IPv6.
async fn read_proxy_v2(s: &mut TcpStream) -> Result<ProxyHeader, String> {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed).await.map_err(|e| e.to_string())?;
    if fixed[..12] != *b"\r\n\r\n\0\r\nQUIT\n" {
        return Err(format!("no v2 signature: {:?}", &fixed[..12]));
    }
    if fixed[12] != 0x21 {
        return Err(format!("version/command {:#x}, want 0x21", fixed[12]));
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).await.map_err(|e| e.to_string())?;
    let (src, dst, tlvs) = match fixed[13] {
        0x11 if len >= 12 => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    rest[o],
                    rest[o + 1],
                    rest[o + 2],
                    rest[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([rest[o], rest[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
                &rest[12..],
            )
        }
        0x21 if len >= 36 => {
            let ip = |o: usize| {
                let b: [u8; 16] = rest[o..o + 16].try_into().unwrap();
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([rest[o], rest[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
                &rest[36..],
            )
        }
        other => return Err(format!("family {other:#x} with length {len}")),
    };
    let mut out = Vec::new();
    let mut t = tlvs;
    while !t.is_empty() {
        if t.len() < 3 {
            return Err(format!("truncated TLV {t:?}"));
        }
        let n = u16::from_be_bytes([t[1], t[2]]) as usize;
        if t.len() < 3 + n {
            return Err(format!("TLV {:#x} of length {n} overruns the header", t[0]));
        }
        out.push((t[0], t[3..3 + n].to_vec()));
        t = &t[3 + n..];
    }
    Ok(ProxyHeader {
        src: SocketAddr::new(src.ip().to_canonical(), src.port()),
        dst: SocketAddr::new(dst.ip().to_canonical(), dst.port()),
        tlvs: out,
    })
}
