//! `meshnode control-plane` run inside the test process on a loopback port (built-in CA in a temporary
//! directory), and a gRPC channel to it over TLS that trusts the root it writes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use meshnode::control_plane::{self, CaChoice, RunOptions};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A running control plane; it stops when dropped.
pub struct Plane {
    /// A lazy TLS channel to it (server name `istiod.istio-system.svc`).
    pub channel: Channel,
    /// Its directory: `mesh.yaml`, `root-cert.pem`, the CA state.
    pub dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Plane {
    /// Serves the mesh file `yaml` on a free loopback port (drain deadline 1 s).
    pub async fn start(yaml: &str) -> Plane {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = RunOptions {
            config: dir.path().join("mesh.yaml"),
            listen: addr,
            ca: CaChoice::Builtin(dir.path().join("state")),
            tls_files: None,
            root_cert_out: Some(dir.path().join("root-cert.pem")),
            drain_deadline: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            control_plane::run(opts, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let channel = channel_to(addr, &dir.path().join("root-cert.pem")).await;
        Plane {
            channel,
            dir,
            _stop: stop,
        }
    }

    /// Replaces the mesh file atomically, as editors and ConfigMap mounts do.
    pub fn write(&self, yaml: &str) {
        let path = self.dir.path().join("mesh.yaml");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
}

/// A channel to the control plane at `addr`, once it has written its root certificate to `root`.
async fn channel_to(addr: SocketAddr, root: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !root.exists() {
        assert!(Instant::now() < deadline, "control plane did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pem = std::fs::read(root).unwrap();
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name("istiod.istio-system.svc"),
        )
        .unwrap()
        .connect_lazy()
}
