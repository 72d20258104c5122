//! The `meshnode` command: parses the command line and environment, sets up logging and the runtime, and
//! runs the chosen role.

use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use meshnode::config::{Config, ProcessEnv};

#[derive(Parser)]
#[command(
    name = "meshnode",
    version,
    about = "Node proxy for an ambient service mesh, compatible with Istio's ztunnel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node proxy (ztunnel's role). Configured through ztunnel's environment variables:
    /// PROXY_MODE, PROXY_WORKLOAD_INFO, LOCAL_XDS_PATH, XDS_ADDRESS, PACKET_MARK, ENABLE_ORIG_SRC, NODE_NAME,
    /// CA_CERTS_DIR, SECRET_TTL, RUST_LOG, ...
    Proxy,
    /// Run the CNI node agent (istio-cni's node agent role): takes pod events from the meshnode-cni plugin,
    /// programs each enrolled pod's redirection rules and hands its network namespace to the node proxy over
    /// ZDS. Configured through istio-cni's environment variables: CNI_AGENT_RUN_DIR, ZTUNNEL_UDS_ADDRESS,
    /// EXCLUDE_NAMESPACES, AMBIENT_ENABLEMENT_SELECTOR, AMBIENT_DNS_CAPTURE, AMBIENT_IPV6, NODE_NAME, and
    /// MESHNODE_AGENT_CONFIG (a local enrollment file, for use without Kubernetes).
    CniAgent,
    /// Run the embedded control plane (istiod's role without Kubernetes): serves delta ADS (workloads,
    /// services, policies) over TLS from one YAML mesh file, pushing changes as deltas.
    ControlPlane {
        /// The mesh file (namespaces, workloads, services, policies, tokens); re-read every second.
        #[arg(long)]
        config: std::path::PathBuf,
        /// Address to listen on (gRPC over TLS).
        #[arg(long, default_value = meshnode::control_plane::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// Server certificate chain (PEM). Without it, a throwaway CA and certificate are generated.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// Server private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// Where to write the throwaway CA certificate clients must trust (XDS_ROOT_CA) when --tls-cert is
        /// not given.
        #[arg(long)]
        root_cert_out: Option<std::path::PathBuf>,
    },
    /// Print the version.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("meshnode {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Proxy => {
            init_logging();
            let cfg = Arc::new(Config::from_source(&ProcessEnv)?);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.worker_threads)
                .thread_name("meshnode-worker")
                .enable_all()
                .build()?;
            rt.block_on(run(cfg))
        }
        Command::CniAgent => {
            init_logging();
            let cfg = Arc::new(meshnode::cni_agent::config::AgentConfig::from_source(
                &ProcessEnv,
            )?);
            let rt = tokio::runtime::Builder::new_current_thread()
                .thread_name("meshnode-cni-agent")
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let (tx, rx) = watch::channel(false);
                tokio::spawn(async move {
                    wait_for_signal().await;
                    // Rules stay in place: enrolled pods remain captured until an agent runs again.
                    tracing::info!("CNI agent stopping; pod rules stay in place");
                    let _ = tx.send(true);
                    wait_for_signal().await;
                    std::process::exit(1);
                });
                meshnode::cni_agent::run(cfg, rx).await
            })?;
            Ok(())
        }
        Command::ControlPlane {
            config,
            listen,
            tls_cert,
            tls_key,
            root_cert_out,
        } => {
            init_logging();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("meshnode-control-plane")
                .enable_all()
                .build()?;
            rt.block_on(run_control_plane(
                config,
                listen,
                tls_cert.zip(tls_key),
                root_cert_out,
            ))
        }
    }
}

async fn run_control_plane(
    config: std::path::PathBuf,
    listen: std::net::SocketAddr,
    tls_files: Option<(std::path::PathBuf, std::path::PathBuf)>,
    root_cert_out: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use meshnode::control_plane::{self as cp, server};
    let plane = cp::ControlPlane::start(&config, cp::POLL_INTERVAL)?;
    let tls = match tls_files {
        Some((cert, key)) => server::tls_config(&std::fs::read(&cert)?, &std::fs::read(&key)?)?,
        None => {
            let cert = server::ServerCert::throwaway(&cp::SERVER_NAMES)?;
            match &root_cert_out {
                Some(path) => std::fs::write(path, &cert.root_pem)?,
                None => tracing::warn!(
                    "no --tls-cert and no --root-cert-out: clients cannot verify the throwaway certificate"
                ),
            }
            cert.tls_config()?
        }
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let listen = listener.local_addr()?;
    tracing::info!(%listen, config = %config.display(), "control plane serving");
    let router = server::router(plane.ads(cp::AdsLimits::default()));
    server::serve(listener, tls, router, async {
        wait_for_signal().await;
        tracing::info!("control plane stopping");
    })
    .await?;
    Ok(())
}

async fn run(cfg: Arc<Config>) -> anyhow::Result<()> {
    let (listeners, readiness) = meshnode::app::bind(&cfg)?;
    tracing::info!(mode = ?cfg.proxy_mode, workload = ?cfg.workload_info, "meshnode proxy starting");
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: draining connections");
        let _ = tx.send(true);
        // A second signal exits at once.
        wait_for_signal().await;
        std::process::exit(1);
    });
    meshnode::app::run_proxy(cfg, listeners, Some(readiness), rx).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
