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

/// xDS `istio.workload.Address`: `name\n` then the protobuf bytes; converted, then indexed into a state.
pub fn xds_address(data: &[u8]) -> bool {
    let (name, bytes) = split_line(data);
    let Ok(addr) = pb::Address::decode(bytes) else {
        return false;
    };
    let (workloads, services) = match convert::address(name, addr) {
        Ok(convert::Address::Workload(w)) => (vec![w], vec![]),
        Ok(convert::Address::Service(s)) => (vec![], vec![s]),
        Err(_) => return false,
    };
    State::new(workloads, services, PolicySet::default()).is_ok()
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

/// ztunnel's local config file (`LOCAL_XDS_PATH`): YAML parsed, validated and indexed.
pub fn local_config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    crate::state::local::LocalConfig::parse(text).is_ok_and(|cfg| cfg.into_state().is_ok())
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

#[cfg(test)]
mod tests {
    /// The committed seeds of the parsers that can say so are accepted, so the fuzzer starts from inputs that
    /// reach the code past the first refusal (a seed that no longer parses after a format change fails here:
    /// regenerate with `cd fuzz && cargo run --bin gen_corpus`).
    type Accepts = fn(&[u8]) -> bool;

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
