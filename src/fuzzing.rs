//! Entry points for the fuzz targets in `fuzz/` (not an API: hidden from the docs, may change at any time).
//!
//! Input: the raw bytes a fuzzer generates. Output: nothing; each function feeds the bytes to one parser of
//! untrusted input exactly as the running code does, and only a panic, an abort or a hang counts. Those
//! that return `bool` say whether the input was accepted (the seed corpora are checked to be). Where the
//! real parser reads from a socket, the bytes travel through a real socket of that kind (unix stream pair,
//! loopback TCP, seqpacket pair, in-memory duplex for HTTP/2), so the code under test is unchanged.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::authz::PolicySet;
use crate::identity::{Authenticate, BuiltinCa, CaService, Identity};
use crate::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use crate::proto::{security, workload as pb};
use crate::state::State;
use crate::xds::convert;

/// The identity whose certificate the CA-answer target checks.
pub const FUZZ_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/default";

/// The fixed P-256 key (PKCS#8 PEM) the CA-answer target pretends to have sent a CSR for, so that a seed
/// signed for it gets past the key check into chain verification.
pub const FUZZ_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgmBuk/sA5EjsZNICg
gAPtmXYQt+cr4DNvgxDGLT9JVPShRANCAAQIw9KbJUrEr8YzCv5pwPLaEWKZbd8z
uMjAcXSVxHZenDLNfOvl6q7bfKky55f9fT8uFs3a/PwqaWI6ekB+T9j1
-----END PRIVATE KEY-----
";

/// The HTTP/2 client preface, prepended to the HBONE target's input.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Splits at the first `\n`: (before, after). No newline: everything is the second part.
fn split_line(data: &[u8]) -> (&str, &[u8]) {
    match data.iter().position(|b| *b == b'\n') {
        Some(i) => (
            std::str::from_utf8(&data[..i]).unwrap_or(""),
            &data[i + 1..],
        ),
        None => ("", data),
    }
}

/// The CNI agent's plugin-event server: one request read from a unix stream (`read_request`).
pub fn plugin_request(data: &[u8]) {
    rt().block_on(async {
        let (mut client, mut server) = tokio::net::UnixStream::pair().expect("socketpair");
        let input = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            client
        });
        let _ = crate::cni_agent::plugin_server::read_request(&mut server).await;
        drop(server);
        let _ = writer.await;
    });
}

/// The proxy's ZDS client: a sequence of agent messages, each `[flags u8][len u16 LE][bytes]`; flag bit 0
/// attaches this process's netns fd, bit 1 an fd of `/dev/null`. Every message is received, decoded and
/// answered as the proxy does.
pub fn zds_client(data: &[u8]) {
    use crate::zds::client::ZdsClient;
    use crate::zds::packet::SeqpacketConn;
    use std::os::fd::AsFd;
    rt().block_on(async {
        let (agent, proxy) = SeqpacketConn::pair().expect("seqpacket pair");
        let Ok(mut client) = ZdsClient::handshake(proxy).await else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        let _ = agent.recv(&mut buf).await; // the hello
        let mut rest = data;
        while rest.len() >= 3 {
            let flags = rest[0];
            let len = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
            let len = len.min(rest.len() - 3);
            let msg = &rest[3..3 + len];
            rest = &rest[3 + len..];
            let fd = if flags & 1 != 0 {
                std::fs::File::open("/proc/self/ns/net").ok()
            } else if flags & 2 != 0 {
                std::fs::File::open("/dev/null").ok()
            } else {
                None
            };
            if agent
                .send(msg, fd.as_ref().map(|f| f.as_fd()))
                .await
                .is_err()
            {
                return;
            }
            let answer = match client.recv().await {
                Ok(_) => client.ack(None).await,
                Err(e) => client.ack(Some(&e.to_string())).await,
            };
            if answer.is_ok() && agent.recv(&mut buf).await.is_err() {
                return;
            }
        }
    });
}

/// A scratch directory for this process, `meshnode-fuzz-<tag>-<pid>`, in `/dev/shm` where there is one
/// (files there are rewritten for every input; a tmpfs keeps that off the disk), else in the temporary
/// directory. A fuzzer or test process never gets to clean up after itself (libFuzzer exits from inside
/// the loop), so the directories of processes that no longer run are removed here.
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let prefix = format!("meshnode-fuzz-{tag}-");
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(&prefix));
        if pid.is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = base.join(format!("{prefix}{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// One message of the ZDS targets' input: `[flags u8][len u16 LE][bytes]` (a short tail is cut to what is
/// there). `None` when fewer than three bytes are left.
fn next_zds_message<'a>(rest: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
    if rest.len() < 3 {
        return None;
    }
    let flags = rest[0];
    let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
    let msg = &rest[3..3 + len];
    *rest = &rest[3 + len..];
    Some((flags, msg))
}

/// Flag bits of a [`zds_server`] message.
pub mod zds_server_flags {
    /// Attach an fd (of `/dev/null`) to the message.
    pub const FD: u8 = 1;
    /// Send it at once, without waiting for a request from the agent (data the agent did not ask for).
    pub const UNASKED: u8 = 2;
    /// After the snapshot: the request this message answers is a `DelWorkload` (else an `AddWorkload`).
    pub const DEL: u8 = 4;
}

/// The pods the [`zds_server`] target's agent announces: one with a netns (this process's), one kept.
struct FuzzSnapshot;

impl crate::zds::SnapshotSource for FuzzSnapshot {
    fn snapshot(&self) -> Vec<crate::zds::SnapshotEntry> {
        let info = |name: &str| crate::proto::workload::zds::WorkloadInfo {
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
        };
        vec![
            crate::zds::SnapshotEntry {
                uid: "uid-a".into(),
                info: info("a"),
                netns: crate::netns::Netns::current().ok(),
            },
            crate::zds::SnapshotEntry {
                uid: "uid-b".into(),
                info: info("b"),
                netns: None,
            },
        ]
    }
}

/// A [`zds_server`] agent: a server accepting on its own socket, started ahead of use.
struct ZdsAgent {
    path: std::path::PathBuf,
    server: crate::zds::ZdsServer,
    stop: tokio::sync::watch::Sender<bool>,
    serving: tokio::task::JoinHandle<()>,
}

/// Agents started ahead: `ZdsServer::serve` opens its first accept on a timer (its 5-a-second accept
/// pacing), which ends on tokio's next millisecond tick, so a server used at once would cost each input
/// up to a millisecond of waiting. One started this many inputs earlier accepts at once.
const ZDS_AGENTS: usize = 16;

/// Binds `path` and starts a server on it (in the fuzz runtime), its accept loop polled once.
async fn start_zds_agent(path: std::path::PathBuf) -> ZdsAgent {
    let listener = crate::zds::bind(&path).expect("binding the ZDS socket");
    let server = crate::zds::ZdsServer::new(Arc::new(FuzzSnapshot));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener, stopped).await })
    };
    tokio::task::yield_now().await;
    ZdsAgent {
        path,
        server,
        stop,
        serving,
    }
}

/// The agent's ZDS server (`zds::server`), as a proxy talks to it: per input, a fresh server on a real
/// `SOCK_SEQPACKET` listener (one of [`ZDS_AGENTS`] started ahead) and one connection to it. The input is
/// a sequence of proxy messages `[flags u8][len u16 LE][bytes]` (see [`zds_server_flags`]): the first is
/// sent as the `ZdsHello`, each next one as the answer (ack) to the next request the agent sends — the
/// snapshot's two pods and `SnapshotSent`, then an `AddWorkload` or `DelWorkload` the agent is asked to
/// send (`add`/`del`, run alongside) — or, flagged unasked, at once. Ends when the input does or the agent
/// closes the connection; the server is then shut down and a new one started in its place.
pub fn zds_server(data: &[u8]) {
    use crate::proto::workload::zds::{workload_request::Payload, WorkloadInfo, WorkloadRequest};
    use crate::zds::SeqpacketConn;
    use std::os::fd::AsFd;
    use zds_server_flags::{DEL, FD, UNASKED};
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    static AGENTS: parking_lot::Mutex<std::collections::VecDeque<ZdsAgent>> =
        parking_lot::Mutex::new(std::collections::VecDeque::new());
    let dir = DIR.get_or_init(|| scratch_dir("zds"));
    let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
    let fd_for = |flags: u8| (flags & FD != 0).then(|| devnull.as_fd());
    rt().block_on(async {
        if AGENTS.lock().is_empty() {
            for i in 0..ZDS_AGENTS {
                let agent = start_zds_agent(dir.join(format!("zds-{i}.sock"))).await;
                AGENTS.lock().push_back(agent);
            }
        }
        let agent = AGENTS.lock().pop_front().expect("an agent started ahead");
        let server = agent.server.clone();
        let proxy = SeqpacketConn::connect(&agent.path)
            .await
            .expect("connecting to the ZDS socket");
        let netns = crate::netns::Netns::current().expect("this process's netns");
        let info = WorkloadInfo {
            name: "c".into(),
            namespace: "default".into(),
            service_account: "c".into(),
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut rest = data;
        let mut snapshot_done = false;
        // Reads the agent's next request and answers it with `msg`; false once the agent has closed.
        async fn answer(
            proxy: &SeqpacketConn,
            buf: &mut [u8],
            msg: &[u8],
            fd: Option<std::os::fd::BorrowedFd<'_>>,
        ) -> Option<WorkloadRequest> {
            let request = match proxy.recv(buf).await {
                Ok((0, fds)) if fds.is_empty() => return None,
                Ok((n, _)) => WorkloadRequest::decode(&buf[..n])
                    .unwrap_or_else(|e| panic!("the agent sent an undecodable request: {e}")),
                Err(_) => return None,
            };
            proxy.send(msg, fd).await.ok()?;
            Some(request)
        }
        if let Some((flags, hello)) = next_zds_message(&mut rest) {
            if proxy.send(hello, fd_for(flags)).await.is_ok() {
                while let Some((flags, msg)) = next_zds_message(&mut rest) {
                    if flags & UNASKED != 0 {
                        if proxy.send(msg, fd_for(flags)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    if !snapshot_done {
                        let Some(request) = answer(&proxy, &mut buf, msg, fd_for(flags)).await
                        else {
                            break;
                        };
                        snapshot_done = matches!(request.payload, Some(Payload::SnapshotSent(_)));
                        continue;
                    }
                    let call = async {
                        if flags & DEL != 0 {
                            let _ = server.del("uid-a").await;
                        } else {
                            let _ = server.add("uid-c", &info, &netns).await;
                        }
                    };
                    let (_, answered) =
                        tokio::join!(call, answer(&proxy, &mut buf, msg, fd_for(flags)));
                    if answered.is_none() {
                        break;
                    }
                }
            }
        }
        drop(proxy);
        let _ = agent.stop.send(true);
        let _ = agent.serving.await;
        let next = start_zds_agent(agent.path).await;
        AGENTS.lock().push_back(next);
    });
}

/// xDS `istio.workload.Address`: `name\n` then the protobuf bytes; converted, then indexed into a state.
pub fn xds_address(data: &[u8]) -> bool {
    let (name, bytes) = split_line(data);
    let Ok(addr) = pb::Address::decode(bytes) else {
        return false;
    };
    let (workloads, services) = match convert::address(name, addr) {
        Ok(convert::Address::Workload(w)) => (vec![w], vec![]),
        Ok(convert::Address::Service(s)) => (vec![], vec![Arc::unwrap_or_clone(s)]),
        Err(_) => return false,
    };
    State::with_shared(workloads, services, Default::default()).is_ok()
}

/// xDS `istio.security.Authorization`: `name\n` then the protobuf bytes; converted, then indexed.
pub fn xds_authorization(data: &[u8]) -> bool {
    let (name, bytes) = split_line(data);
    let Ok(auth) = security::Authorization::decode(bytes) else {
        return false;
    };
    convert::policy(name, auth).is_ok_and(|policy| PolicySet::new(vec![policy]).is_ok())
}

fn fuzz_key() -> rcgen::KeyPair {
    rcgen::KeyPair::from_pem(FUZZ_KEY_PEM).expect("the fixed fuzz key parses")
}

/// The CA client's check of a `CreateCertificate` answer (protobuf `IstioCertificateResponse` bytes),
/// for [`FUZZ_IDENTITY`] and the key [`FUZZ_KEY_PEM`].
pub fn ca_answer(data: &[u8]) -> bool {
    let Ok(response) = IstioCertificateResponse::decode(data) else {
        return false;
    };
    let id: Identity = FUZZ_IDENTITY.parse().expect("a valid SPIFFE id");
    crate::identity::caclient::check_answer(&id, fuzz_key(), &response.cert_chain).is_ok()
}

struct AllowAll;

impl Authenticate for AllowAll {
    fn authorize(
        &self,
        _token: Option<&str>,
        _requested: &Identity,
        _impersonating: bool,
    ) -> Result<(), tonic::Status> {
        Ok(())
    }
}

/// The CA server's handling of a `CreateCertificate` request (protobuf `IstioCertificateRequest` bytes):
/// CSR parsing and verification, identity and metadata checks, signing (every caller authorized).
pub fn ca_request(data: &[u8]) -> bool {
    static CA: OnceLock<CaService> = OnceLock::new();
    let ca = CA.get_or_init(|| {
        let ttl = Duration::from_secs(24 * 3600);
        let signer = BuiltinCa::ephemeral(ttl).expect("an in-memory CA");
        CaService::new(Arc::new(signer), Arc::new(AllowAll), ttl)
    });
    let Ok(request) = IstioCertificateRequest::decode(data) else {
        return false;
    };
    ca.create(None, &request).is_ok()
}

/// One HBONE connection's HTTP/2 input (after the TLS handshake; the client preface is prepended) served by
/// the real HBONE server, each stream checked as the inbound path starts: method, `:authority` as
/// `ip:port` or `host:port`, the `forwarded` header; then refused or accepted.
pub fn hbone_connect(data: &[u8]) {
    use crate::hbone::server::{self, Incoming};
    rt().block_on(async {
        let (client, conn) = tokio::io::duplex(1 << 20);
        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        let mut input = H2_PREFACE.to_vec();
        input.extend_from_slice(data);
        let writer = tokio::spawn(async move {
            let _ = client_wr.write_all(&input).await;
            let _ = client_wr.shutdown().await;
            client_wr
        });
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 * 1024];
            while matches!(client_rd.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let cfg = crate::config::H2Config {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            frame_size: 1 << 20,
        };
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let timeouts = server::Timeouts {
            handshake_deadline: tokio::time::Instant::now() + Duration::from_secs(1),
            idle: Duration::from_secs(1),
        };
        let serve = server::serve(
            conn,
            &cfg,
            timeouts,
            (),
            shutdown,
            |incoming: Incoming| async move {
                let req = &incoming.request;
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.as_str().to_string())
                    .unwrap_or_default();
                let target_ok = authority.parse::<SocketAddr>().is_ok()
                    || authority
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                        .is_some();
                let _ = crate::proxy::inbound::forwarded_for(req.headers());
                if req.method() == http::Method::CONNECT && target_ok {
                    let _ = incoming.accept(http::HeaderMap::new());
                } else {
                    incoming.refuse(http::StatusCode::BAD_REQUEST);
                }
            },
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), serve).await;
        let _ = writer.await;
        let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
    });
}

/// The address the [`check_connect`] target's connections arrive on (its workload's address).
pub const CHECK_CONNECT_LOCAL: &str = "127.0.0.77:15008";
/// The peer the [`check_connect`] target's connections come from, unless the input names another identity.
pub const CHECK_CONNECT_PEER: &str = "127.0.0.88:40000";
/// The peer's identity by default: the one principal the workload's ALLOW policy admits.
pub const CHECK_CONNECT_CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
/// The port that the namespace's DENY policy closes to everyone.
pub const CHECK_CONNECT_DENIED_PORT: u16 = 9090;

/// The fixed mesh of the [`check_connect`] target: the local workload `server` (127.0.0.77) behind two
/// services (one of them mapping a port onto the proxy's own :15006), an ALLOW-only-`client` policy, a
/// namespace DENY on port 9090, and the client workload (127.0.0.88). `app` is the port of the test
/// application that admitted streams reach.
fn check_connect_mesh(app: u16) -> String {
    format!(
        r#"workloads:
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.0.0.77"]
  protocol: HBONE
  authorizationPolicies: [default/only-client]
  services:
    "default/server.default.svc.cluster.local": {{80: {app}}}
    "default/loop.default.svc.cluster.local": {{81: 15006}}
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.0.88"]
  protocol: HBONE
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {{80: {app}, 8443: 0}}
- name: loop
  namespace: default
  hostname: loop.default.svc.cluster.local
  vips: ["/10.96.0.11"]
  ports: {{81: 15006}}
policies:
- name: only-client
  namespace: default
  scope: WorkloadSelector
  action: Allow
  rules: [[[{{principals: [!Exact "cluster.local/ns/default/sa/client"]}}]]]
- name: no-admin
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{{destinationPorts: [{CHECK_CONNECT_DENIED_PORT}]}}]]]
"#
    )
}

/// The [`check_connect`] target's proxy (for workload `default/server/server` on [`check_connect_mesh`])
/// and the port of its application on 127.0.0.77, which accepts every connection and holds the last 64
/// (the proxy side resets them; one closed at once by the application could reset the proxy's connect).
fn check_connect_proxy() -> &'static (Arc<crate::proxy::Proxy>, u16) {
    static PROXY: OnceLock<(Arc<crate::proxy::Proxy>, u16)> = OnceLock::new();
    PROXY.get_or_init(|| {
        let app = std::net::TcpListener::bind("127.0.0.77:0").expect("the test application's port");
        let port = app.local_addr().expect("its address").port();
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            for conn in app.incoming().flatten() {
                if held.len() == 64 {
                    held.pop_front();
                }
                held.push_back(conn);
            }
        });
        let mut env = std::collections::HashMap::new();
        env.insert("PROXY_MODE", "dedicated");
        env.insert("PROXY_WORKLOAD_INFO", "default/server/server");
        env.insert("XDS_ADDRESS", "");
        let cfg = crate::config::Config::from_source(&env).expect("the target's config");
        let workload = cfg.workload_info.clone().expect("a workload");
        let yaml = check_connect_mesh(port);
        let state = crate::state::LocalConfig::parse(&yaml)
            .expect("the target's mesh parses")
            .into_state()
            .expect("the target's mesh is consistent");
        let (state_tx, state) = crate::state::StateHandle::new(state);
        // The proxy lives as long as the process; so does the sender of its state.
        std::mem::forget(state_tx);
        let ca = BuiltinCa::ephemeral(Duration::from_secs(3600)).expect("an in-memory CA");
        let (_, shutdown) = tokio::sync::watch::channel(false);
        let proxy = rt().block_on(async {
            crate::proxy::Proxy::new(
                crate::proxy::ProxyInputs {
                    cfg: Arc::new(cfg),
                    state,
                    certs: crate::identity::CertManager::new(Arc::new(ca)),
                    workload,
                    sock: crate::socket::SocketOpts::default(),
                    orig_src: false,
                    netns: None,
                    metrics: Default::default(),
                    resolver: None,
                    handover: None,
                },
                shutdown,
            )
        });
        (proxy, port)
    })
}

/// The inbound CONNECT decision (`Proxy::check_connect`: method, authority, self-call, source workload,
/// authorization, upstream connect) on a request head made of the input, against
/// [`check_connect_mesh`]:
///
/// ```text
/// METHOD SP AUTHORITY [SP PEER-IDENTITY]\n
/// name: value\n        (headers, e.g. `forwarded: for="…"`; a line that is not a valid header is skipped)
/// ```
///
/// The request arrives on [`CHECK_CONNECT_LOCAL`] from [`CHECK_CONNECT_PEER`], whose certificate says
/// PEER-IDENTITY (default [`CHECK_CONNECT_CLIENT`]). Besides never panicking, the decision must never
/// admit what the rules refuse: only CONNECT, only to the local address, never to one of the proxy's own
/// ports or the denied port, only for the allowed principal; and it leaves no connection registered.
/// Returns whether the stream was admitted.
pub fn check_connect(data: &[u8]) -> bool {
    let (proxy, _app) = check_connect_proxy();
    let (head, headers) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut words = head.splitn(3, |b| *b == b' ');
    let Ok(method) = http::Method::from_bytes(words.next().unwrap_or_default()) else {
        return false;
    };
    let mut uri = http::uri::Parts::default();
    match words.next().unwrap_or_default() {
        [] => uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/")),
        authority => match http::uri::Authority::try_from(authority) {
            Ok(a) => uri.authority = Some(a),
            Err(_) => return false,
        },
    }
    let Ok(uri) = http::Uri::from_parts(uri) else {
        return false;
    };
    let peer_id: Identity = match words.next() {
        Some(id) => match std::str::from_utf8(id).ok().and_then(|s| s.parse().ok()) {
            Some(id) => id,
            None => return false,
        },
        None => CHECK_CONNECT_CLIENT.parse().expect("a valid SPIFFE id"),
    };
    let mut request = http::Request::new(());
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    for line in headers.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = http::HeaderName::from_bytes(line[..colon].trim_ascii());
        let value = http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (name, value) {
            request.headers_mut().append(name, value);
        }
    }
    let local: SocketAddr = CHECK_CONNECT_LOCAL.parse().expect("an address");
    let peer: SocketAddr = CHECK_CONNECT_PEER.parse().expect("an address");
    let decision = rt().block_on(proxy.connect_decision(&request, peer, local, &peer_id));
    assert!(
        proxy.connections().is_empty(),
        "a decided stream stayed registered"
    );
    match decision {
        Ok(target) => {
            assert_eq!(method, http::Method::CONNECT, "{method} admitted");
            assert_eq!(target.ip(), local.ip(), "admitted to another address");
            assert!(
                !proxy.cfg().ports.illegal().contains(&target.port()),
                "admitted to the proxy's own port {target}"
            );
            assert_ne!(
                target.port(),
                CHECK_CONNECT_DENIED_PORT,
                "the DENY was ignored"
            );
            assert_eq!(
                peer_id.to_string(),
                CHECK_CONNECT_CLIENT,
                "a principal the ALLOW does not name was admitted"
            );
            true
        }
        Err(status) => {
            if method != http::Method::CONNECT {
                assert_eq!(
                    status,
                    http::StatusCode::BAD_REQUEST,
                    "{method} answered {status}"
                );
            }
            false
        }
    }
}

/// ztunnel's local config file (`LOCAL_XDS_PATH`): YAML parsed, validated and indexed. The same text cut
/// into pieces (as a large file is, to be parsed on several threads) must load to the same state or the
/// same error; a difference panics.
pub fn local_config(data: &[u8]) -> bool {
    use crate::state::local;
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let whole = local::LocalConfig::parse(text).and_then(local::LocalConfig::into_state);
    let pieces = local::state_in_small_pieces(text);
    let show = |st: &Result<crate::state::State, local::Error>| match st {
        Ok(st) => Ok(comparable(st)),
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(show(&pieces), show(&whole), "loaded in pieces vs whole");
    whole.is_ok()
}

/// A state's workloads, services and policies, as text.
fn comparable(st: &crate::state::State) -> String {
    let workloads: Vec<_> = st.workloads().collect();
    let services: Vec<_> = st.services().collect();
    let policies: Vec<_> = st.policies().iter().collect();
    format!("{workloads:?}\n{services:?}\n{policies:?}")
}

/// The CNI agent's standalone enrollment file (`MESHNODE_AGENT_CONFIG`).
pub fn agent_enrollment(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    crate::cni_agent::local::parse(std::path::Path::new("fuzz.yaml"), text).is_ok()
}

/// The control plane's mesh file: parsed and validated, translated into xDS resources, and every resource
/// then converted as a proxy receiving it would. A resource the proxy refuses is a bug (the control plane
/// would serve what its own proxies NACK), so that panics.
pub fn mesh_config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(cfg) = crate::control_plane::config::MeshConfig::parse(text) else {
        return false;
    };
    let resources = crate::control_plane::translate::translate(&cfg);
    for (name, addr) in resources.addresses {
        if let Err(e) = convert::address(&name, addr.clone()) {
            panic!("control plane sent address {name} that the proxy refuses: {e}\n{addr:?}");
        }
    }
    for (name, auth) in resources.authorizations {
        if let Err(e) = convert::policy(&name, auth.clone()) {
            panic!("control plane sent policy {name} that the proxy refuses: {e}\n{auth:?}");
        }
    }
    true
}

/// The admin ports' HTTP server: one connection over loopback TCP, its head read (`read_head`) and answered.
pub fn admin_http(data: &[u8]) {
    use crate::admin_http::Answer;
    static LISTENER: OnceLock<tokio::net::TcpListener> = OnceLock::new();
    rt().block_on(async {
        let listener = LISTENER.get_or_init(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
            l.set_nonblocking(true).expect("nonblocking listener");
            tokio::net::TcpListener::from_std(l).expect("listener into tokio")
        });
        let addr = listener.local_addr().expect("listener address");
        let Ok(mut client) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        let Ok((server, _)) = listener.accept().await else {
            return;
        };
        // No TIME_WAIT left behind: a long run opens a million connections.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        let _ = socket2::SockRef::from(&server).set_linger(Some(Duration::ZERO));
        let input = data.to_vec();
        let exchange = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let handler = |method: &str, path: &str| match (method, path) {
            ("GET", "/healthz/ready") => Answer::text(200, "OK", "ready\n"),
            _ => Answer::not_found(),
        };
        let head_read = std::sync::atomic::AtomicBool::new(false);
        let served = crate::admin_http::answer(server, &handler, &head_read);
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            tokio::join!(exchange, served)
        })
        .await;
    });
}

/// One DNS query, as a pod's DNS proxy receives it over UDP (and then over TCP), against a small mesh:
/// whatever the proxy answers without asking upstream must be a DNS response carrying the query's id, and
/// over UDP no larger than 1232 bytes. Returns whether the query was answered here.
pub fn dns_query(data: &[u8]) -> bool {
    use crate::dns::upstream::Transport;
    static POD: OnceLock<crate::dns::PodDns> = OnceLock::new();
    let pod = POD.get_or_init(|| {
        let mut yaml = String::from(
            "workloads:\n- {uid: c//v1/Pod/default/client, name: client, namespace: default, workloadIps: [10.0.0.1]}\n",
        );
        for i in 0..200 {
            yaml.push_str(&format!(
                "- {{uid: c//v1/Pod/default/db-{i}, name: db-{i}, namespace: default, workloadIps: [\"10.1.0.{}\", \"fd00::{i:x}\"], services: {{\"default/db.default.svc.cluster.local\": {{}}}}}}\n",
                i + 1
            ));
        }
        yaml.push_str("services:\n- {name: db, namespace: default, hostname: db.default.svc.cluster.local}\n- {name: reviews, namespace: default, hostname: reviews.default.svc.cluster.local, vips: [/10.96.0.10, /fd00:96::10]}\n- {name: any, namespace: default, hostname: \"*.example.com\", vips: [/240.240.0.1]}\n");
        let state = crate::state::LocalConfig::parse(&yaml)
            .and_then(crate::state::LocalConfig::into_state)
            .expect("the fuzz mesh loads");
        let (tx, handle) = crate::state::StateHandle::new(state);
        std::mem::forget(tx);
        crate::dns::PodDns {
            resolver: crate::dns::Resolver::from_parts(
                crate::dns::names::Names::new("cluster.local", None, true),
                "",
                handle,
                Arc::new(crate::metrics::Metrics::new()),
            ),
            workload: crate::config::WorkloadInfo {
                namespace: "default".into(),
                name: "client".into(),
                service_account: "default".into(),
            },
            netns: None,
        }
    });
    let mut answered = false;
    for (transport, limit) in [
        (Transport::Udp, 1232),
        (Transport::Tcp, usize::from(u16::MAX)),
    ] {
        if let Some(a) = pod.answer_here(data, transport) {
            assert!(
                a.len() >= 12 && a.len() <= limit,
                "answer of {} bytes",
                a.len()
            );
            assert_eq!(a[..2], data[..2], "the answer carries the query's id");
            assert!(a[2] & 0x80 != 0, "the answer is a response");
            answered = true;
        }
    }
    answered
}

#[cfg(test)]
mod tests {
    /// The committed seeds of the parsers that can say so are accepted, so the fuzzer starts from inputs that
    /// reach the code past the first refusal (a seed that no longer parses after a format change fails here:
    /// regenerate with `cd fuzz && cargo run --bin gen_corpus`).
    type Accepts = fn(&[u8]) -> bool;

    fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        out.sort();
        assert!(!out.is_empty(), "{target}: no seeds");
        out
    }

    /// The CONNECT seeds are decided as the target's mesh says: admitted only for the allowed principal
    /// through the service, refused for the rest (so the fuzzer starts from both sides of every check).
    #[test]
    fn check_connect_seeds_are_admitted_or_refused_as_the_mesh_says() {
        for (name, bytes) in seeds("check_connect") {
            let admitted = super::check_connect(&bytes);
            let want = matches!(name.as_str(), "seed-service" | "seed-forwarded-other");
            assert_eq!(admitted, want, "{name}");
        }
    }

    /// The DNS seeds for mesh names are answered by the proxy itself; the MX one is left to forwarding.
    #[test]
    fn dns_seeds_for_mesh_names_are_answered_here_and_other_types_are_not() {
        for (name, bytes) in seeds("dns_query") {
            assert_eq!(
                super::dns_query(&bytes),
                name != "seed-mx-forwarded",
                "{name}"
            );
        }
    }

    /// The agent-side ZDS seeds run through a real server without a panic or a hang.
    #[test]
    fn zds_server_seeds_run_to_the_end() {
        for (_, bytes) in seeds("zds_server") {
            super::zds_server(&bytes);
        }
    }

    #[test]
    fn seed_corpora_are_accepted() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let targets: [(&str, Accepts); 7] = [
            ("xds_address", super::xds_address),
            ("xds_authorization", super::xds_authorization),
            ("ca_answer", super::ca_answer),
            ("ca_request", super::ca_request),
            ("local_config", super::local_config),
            ("agent_enrollment", super::agent_enrollment),
            ("mesh_config", super::mesh_config),
        ];
        for (target, accepts) in targets {
            let mut seeds = 0;
            for entry in std::fs::read_dir(root.join(target)).unwrap() {
                let path = entry.unwrap().path();
                if !path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("seed-")
                {
                    continue;
                }
                assert!(
                    accepts(&std::fs::read(&path).unwrap()),
                    "{} refused",
                    path.display()
                );
                seeds += 1;
            }
            assert!(seeds > 0, "{target}: no seeds");
        }
    }
}
