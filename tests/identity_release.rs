//! Workload identities are held only while a workload's proxy uses them: pods sharing a service account
//! share one certificate; when the last of them has gone (its proxy drained) the certificate is released,
//! a connection still in flight during the drain keeps working, and a pod added again gets a fresh
//! certificate. In one process over loopback, like `hbone.rs`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use meshnode::identity::{BoxFuture, BuiltinCa, CertManager, CertSource, Identity, WorkloadCert};
use meshnode::proxy::{Listeners, Proxy, ProxyInputs};
use meshnode::socket::{self, SocketOpts};
use meshnode::state::{LocalConfig, StateHandle};
use support::*;
use tokio::sync::watch;

const TTL: Duration = Duration::from_secs(3600);
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// The built-in CA, counting what it is asked for.
struct Counting {
    ca: BuiltinCa,
    fetches: AtomicUsize,
}

impl CertSource for Counting {
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCert, meshnode::identity::Error>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let now = SystemTime::now();
        let cert = self.ca.issue(id, now - Duration::from_secs(60), now + TTL);
        Box::pin(async move { cert })
    }
}

/// Two pods of one service account (`server-a` at .3, `server-b` at .4) and a client workload at .2.
fn mesh_yaml(net: [u8; 2]) -> String {
    let pod = |name: &str, sa: &str, host: u8| {
        format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n",
            ip(net, host)
        )
    };
    format!(
        "workloads:\n{}{}{}services: []\npolicies: []\n",
        pod("client", "client", 2),
        pod("server-a", "server", 3),
        pod("server-b", "server", 4)
    )
}

/// A pod's proxy on a shared certificate manager.
struct PodProxy {
    proxy: Arc<Proxy>,
    drain: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_pod(certs: &Arc<CertManager>, net: [u8; 2], workload: &str, host: u8) -> PodProxy {
    let cfg = Arc::new(config(
        workload,
        &[("CONNECTION_TERMINATION_DEADLINE", "30s")],
    ));
    let st = LocalConfig::parse(&mesh_yaml(net))
        .unwrap()
        .into_state()
        .unwrap();
    let (state_tx, state) = StateHandle::new(st);
    // The state sender must outlive the proxy; leak it into a task that ends with the test.
    tokio::spawn(async move { state_tx.closed().await });
    let bind = ip(net, host);
    let opts = SocketOpts::default();
    let listeners = Listeners {
        outbound: socket::listen(SocketAddr::new(bind, 0), opts).unwrap(),
        inbound: socket::listen(SocketAddr::new(bind, cfg.ports.inbound), opts).unwrap(),
        inbound_plaintext: socket::listen(SocketAddr::new(bind, 0), opts).unwrap(),
    };
    let (drain, drained) = watch::channel(false);
    let proxy = Proxy::new(
        ProxyInputs {
            cfg: cfg.clone(),
            state,
            certs: certs.clone(),
            workload: cfg.workload_info.clone().unwrap(),
            sock: SocketOpts::default(),
            orig_src: false,
            netns: None,
            metrics: Default::default(),
            resolver: None,
            handover: None,
        },
        drained,
    );
    // As in-pod mode does when a pod is handed over: fetch its certificate ahead.
    proxy.tls_for(&id(SERVER)).await.unwrap();
    let p = proxy.clone();
    let task = tokio::spawn(async move { p.serve(listeners).await });
    PodProxy { proxy, drain, task }
}

impl PodProxy {
    /// The pod leaves: drain, wait for its connections, drop the proxy.
    async fn remove(self) {
        let _ = self.drain.send(true);
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the drained proxy stops")
            .unwrap();
        drop(self.proxy);
    }
}

/// Waits until `certs` holds exactly `want`.
async fn held(certs: &CertManager, want: &[Identity]) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while certs.identities() != want {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("held {:?}, want {want:?}", certs.identities()));
}

/// An open CONNECT stream through HBONE to the echo app behind `server`.
struct Tunnel {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    _conn: h2::client::SendRequest<Bytes>,
}

impl Tunnel {
    async fn open(ca: &BuiltinCa, server: SocketAddr, app: SocketAddr) -> Tunnel {
        let now = SystemTime::now();
        let cert = ca
            .issue(
                &id("spiffe://cluster.local/ns/default/sa/client"),
                now - Duration::from_secs(60),
                now + TTL,
            )
            .unwrap();
        let conn = hbone_client(cert, id(SERVER), server).await.unwrap();
        let mut ready = conn.clone().ready().await.unwrap();
        let (resp, send) = ready
            .send_request(connect(&app.to_string()), false)
            .unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut t = Tunnel {
            send,
            recv: resp.into_body(),
            _conn: conn,
        };
        let hello = t.read().await;
        assert!(hello.starts_with("peer="), "{hello}");
        t
    }

    async fn read(&mut self) -> String {
        let chunk = tokio::time::timeout(Duration::from_secs(10), self.recv.data())
            .await
            .expect("an answer")
            .expect("stream open")
            .unwrap();
        let _ = self.recv.flow_control().release_capacity(chunk.len());
        String::from_utf8_lossy(&chunk).into_owned()
    }

    async fn echo(&mut self, msg: &str) {
        self.send
            .send_data(Bytes::copy_from_slice(msg.as_bytes()), false)
            .unwrap();
        assert_eq!(self.read().await, msg);
    }
}

#[tokio::test]
async fn departed_pods_release_their_identity_once_the_last_one_sharing_it_has_drained() {
    let net = loopback_net();
    let source = Arc::new(Counting {
        ca: BuiltinCa::ephemeral(TTL).unwrap(),
        fetches: AtomicUsize::new(0),
    });
    let certs = CertManager::new(source.clone());
    let a = start_pod(&certs, net, "default/server-a/server", 3).await;
    let b = start_pod(&certs, net, "default/server-b/server", 4).await;
    echo_server(SocketAddr::new(ip(net, 3), 8080)).await;
    assert_eq!(
        source.fetches.load(Ordering::SeqCst),
        1,
        "one certificate per identity"
    );
    assert_eq!(certs.identities(), vec![id(SERVER)]);
    let first_leaf = a
        .proxy
        .tls_for(&id(SERVER))
        .await
        .unwrap()
        .current()
        .cert
        .chain[0]
        .clone();

    // A connection in flight to pod A.
    let mut tunnel = Tunnel::open(
        &source.ca,
        SocketAddr::new(ip(net, 3), 15008),
        SocketAddr::new(ip(net, 3), 8080),
    )
    .await;
    tunnel.echo("before").await;

    // Pod A leaves while its connection is open: the connection keeps working during the drain.
    let _ = a.drain.send(true);
    tunnel.echo("during the drain").await;
    tunnel.send.send_data(Bytes::new(), true).unwrap();
    drop(tunnel);
    a.remove().await;
    // Pod B still uses the identity.
    held(&certs, &[id(SERVER)]).await;

    // The last pod of that service account leaves: the certificate is released.
    b.remove().await;
    held(&certs, &[]).await;

    // Pod A comes back: a fresh certificate, and traffic flows.
    let again = start_pod(&certs, net, "default/server-a/server", 3).await;
    assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
    let new_leaf = again
        .proxy
        .tls_for(&id(SERVER))
        .await
        .unwrap()
        .current()
        .cert
        .chain[0]
        .clone();
    assert_ne!(new_leaf, first_leaf);
    let mut tunnel = Tunnel::open(
        &source.ca,
        SocketAddr::new(ip(net, 3), 15008),
        SocketAddr::new(ip(net, 3), 8080),
    )
    .await;
    tunnel.echo("back").await;
}
