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
    }
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
