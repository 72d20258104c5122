//! The `meshnode` command: parses the command line and environment, sets up logging and the runtime, and
//! runs the chosen role.

use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio::sync::watch;

use meshnode::config::{Config, ProcessEnv};

/// jemalloc, as ztunnel uses: freed memory goes back to the system in the background (a load's transient
/// peak does not stay resident), and sampled allocations can be dumped as a heap profile (the admin port's
/// `/debug/pprof/heap`, once activated).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options, read by jemalloc itself through this symbol: profiling available but
/// inactive (its cost is then one branch per allocation) with a sample every 512 KiB on average; no
/// transparent huge pages; a background thread returning memory unused for 5 s.
// SAFETY (export_name): jemalloc reads `malloc_conf` as a NUL-terminated string during its own
// initialisation; this is such a string and nothing else defines the symbol.
#[allow(unsafe_code, non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &[u8] =
    b"prof:true,prof_active:false,lg_prof_sample:19,thp:never,background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:5000\0";

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
    /// Run the node proxy (ztunnel's role), configured through ztunnel's environment variables (`--help`
    /// lists every one).
    Proxy {
        /// What Istio's ztunnel chart passes after the role (`args: [proxy, ztunnel]`); ignored, as ztunnel
        /// ignores it.
        #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
        _ignored: Vec<String>,
    },
    /// Run a waypoint (an L7 proxy for one namespace's waypoint Gateway, Envoy's role in Istio ambient):
    /// HBONE in on :15008, HTTP routes, L7 authorization and retries, HBONE out to the endpoints' node
    /// proxies, request metrics on :15020, readiness on :15021. Configured through the node proxy's
    /// variables plus the waypoint's own (`--help` lists every one).
    Waypoint,
    /// Run a network's east-west gateway (Istio's `istio-east-west` Gateway): terminates the outer HBONE
    /// tunnel of double HBONE from other networks with its own identity on :15008 and forwards the inner
    /// one, unopened, to the service's endpoint (or waypoint) on its network. Configured through the node
    /// proxy's variables (`NETWORK` required) plus its own (`--help` lists every one).
    Gateway,
    /// Run the CNI node agent (istio-cni's node agent role): takes pod events from the meshnode-cni plugin,
    /// programs each enrolled pod's redirection rules and hands its network namespace to the node proxy over
    /// ZDS. Configured through istio-cni's environment variables and MESHNODE_AGENT_CONFIG (a local
    /// enrollment file, for use without Kubernetes); `--help` lists every one.
    CniAgent,
    /// Run the embedded control plane (istiod's role without Kubernetes): serves delta ADS (workloads,
    /// services, policies) over TLS from one YAML mesh file, pushing changes as deltas.
    ControlPlane {
        /// The mesh file (namespaces, workloads, services, policies, tokens); re-read every second.
        #[arg(long)]
        config: std::path::PathBuf,
        /// Address to listen on (gRPC over TLS: xDS and the CA).
        #[arg(long, default_value = meshnode::control_plane::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// An istiod plug-in CA directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem). Without it,
        /// the built-in CA under MESHNODE_STATE_DIR (default /var/lib/meshnode) is used.
        #[arg(long, env = "CA_CERTS_DIR")]
        ca_dir: Option<std::path::PathBuf>,
        /// State directory of the built-in CA.
        #[arg(long, env = "MESHNODE_STATE_DIR", default_value = meshnode::config::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
        /// Serving certificate chain (PEM). Without it, one is issued by the mesh CA.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// Serving private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// Where to write the mesh root certificate that proxies trust (their XDS_ROOT_CA and CA_ROOT_CA).
        #[arg(long)]
        root_cert_out: Option<std::path::PathBuf>,
        /// On SIGTERM/SIGINT: how long connected proxies get before their streams are closed (they reconnect
        /// to another instance), e.g. 10s, 500ms. A second signal exits at once.
        #[arg(long, env = "CONTROL_PLANE_DRAIN_DEADLINE", default_value = "10s", value_parser = meshnode::config::duration)]
        drain_deadline: std::time::Duration,
    },
    /// The whole mesh on this machine, no Kubernetes needed: two nodes made of network namespaces, each
    /// with a CNI agent and a node proxy, the embedded control plane and bookinfo. Without a subcommand it
    /// runs the Istio ambient tutorial on it and removes it again (needs root).
    Sandbox(meshnode::sandbox::cli::SandboxArgs),
    /// Print the version.
    Version,
}

/// The command line, with each role's environment variables listed in its `--help`.
fn command() -> clap::Command {
    use meshnode::config::vars::render;
    use meshnode::config::{gateway::GATEWAY_VARS, waypoint::WAYPOINT_VARS, PROXY_VARS};
    use meshnode::logging::LOGGING_VARS;
    let proxy = render(&[("Environment", PROXY_VARS), ("Logging", LOGGING_VARS)]);
    let waypoint = render(&[
        ("Environment (the waypoint's own)", WAYPOINT_VARS),
        ("Environment (shared with the node proxy)", PROXY_VARS),
        ("Logging", LOGGING_VARS),
    ]);
    let gateway = render(&[
        ("Environment (the gateway's own)", GATEWAY_VARS),
        ("Environment (shared with the node proxy)", PROXY_VARS),
        ("Logging", LOGGING_VARS),
    ]);
    let agent = render(&[
        ("Environment", meshnode::cni_agent::config::CNI_AGENT_VARS),
        ("Logging", LOGGING_VARS),
    ]);
    Cli::command()
        .mut_subcommand("proxy", |c| c.after_long_help(proxy))
        .mut_subcommand("waypoint", |c| c.after_long_help(waypoint))
        .mut_subcommand("gateway", |c| c.after_long_help(gateway))
        .mut_subcommand("cni-agent", |c| c.after_long_help(agent))
}

fn main() -> anyhow::Result<()> {
    // Istio's istio-cni chart runs `command: [install-cni]` (with its log flags, ignored): the image links
    // install-cni to meshnode, and under that name meshnode is the CNI agent.
    let argv0 = std::env::args_os().next().map(std::path::PathBuf::from);
    let cli = match argv0.as_deref().and_then(std::path::Path::file_name) {
        Some(name) if name == "install-cni" => Cli {
            command: Command::CniAgent,
        },
        _ => Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit()),
    };
    match cli.command {
        Command::Sandbox(args) => {
            let (_logs, log_guard) = meshnode::logging::init();
            let code = meshnode::sandbox::cli::main(args);
            // `exit` skips destructors: the guard writes out the buffered lines first.
            drop(log_guard);
            std::process::exit(code);
        }
        Command::Version => {
            println!(
                "meshnode {} (revision {}, {} build)",
                env!("CARGO_PKG_VERSION"),
                env!("MESHNODE_GIT_REVISION"),
                if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                }
            );
            Ok(())
        }
        Command::Proxy { .. } => {
            let (logs, _log_guard) = meshnode::logging::init();
            let cfg = Arc::new(Config::from_source(&ProcessEnv)?);
            raise_fd_limit();
            let rt = worker_runtime(cfg.worker_threads)?;
            rt.block_on(run(cfg, logs))
        }
        Command::Waypoint => {
            let (_logs, _log_guard) = meshnode::logging::init();
            let cfg = Arc::new(meshnode::config::WaypointConfig::from_source(&ProcessEnv)?);
            raise_fd_limit();
            let rt = worker_runtime(cfg.base.worker_threads)?;
            rt.block_on(run_waypoint(cfg))
        }
        Command::Gateway => {
            let (_logs, _log_guard) = meshnode::logging::init();
            let cfg = Arc::new(meshnode::config::GatewayConfig::from_source(&ProcessEnv)?);
            raise_fd_limit();
            let rt = worker_runtime(cfg.base.worker_threads)?;
            rt.block_on(run_gateway(cfg))
        }
        Command::CniAgent => {
            let (_logs, _log_guard) = meshnode::logging::init();
            let cfg = Arc::new(meshnode::cni_agent::config::AgentConfig::from_source(
                &ProcessEnv,
            )?);
            let rt = tokio::runtime::Builder::new_current_thread()
                .thread_name("meshnode-cni-agent")
                .enable_all()
                .build()?;
            rt.block_on(async move {
                // Rules stay in place: enrolled pods remain captured until an agent runs again.
                let rx = stop_on_signal("CNI agent stopping; pod rules stay in place");
                meshnode::cni_agent::run(cfg, rx).await
            })?;
            Ok(())
        }
        Command::ControlPlane {
            config,
            listen,
            ca_dir,
            state_dir,
            tls_cert,
            tls_key,
            root_cert_out,
            drain_deadline,
        } => {
            let (_logs, _log_guard) = meshnode::logging::init();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("meshnode-control-plane")
                .enable_all()
                .build()?;
            let opts = meshnode::control_plane::RunOptions {
                config,
                listen,
                ca: match ca_dir {
                    Some(dir) => meshnode::control_plane::CaChoice::Plugin(dir),
                    None => meshnode::control_plane::CaChoice::Builtin(state_dir),
                },
                tls_files: tls_cert.zip(tls_key),
                root_cert_out,
                drain_deadline,
            };
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(opts.listen).await?;
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let mut signals = Signals::new();
                tokio::spawn(async move {
                    signals.next().await;
                    tracing::info!(deadline = ?drain_deadline, "control plane stopping");
                    let _ = stop.send(());
                    // A second signal exits at once.
                    signals.next().await;
                    tracing::info!("second signal: exiting now");
                    meshnode::logging::exit(1);
                });
                meshnode::control_plane::run(opts, listener, async {
                    let _ = stopped.await;
                })
                .await?;
                tracing::info!("control plane stopped");
                anyhow::Ok(())
            })
        }
    }
}

async fn run(cfg: Arc<Config>, logs: meshnode::logging::LogControl) -> anyhow::Result<()> {
    let (listeners, readiness) = meshnode::app::bind(&cfg)?;
    let metrics = match meshnode::app::bind_metrics(&cfg) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "metrics port unavailable; serving without /metrics");
            None
        }
    };
    let admin = match meshnode::app::bind_admin(&cfg) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, port = cfg.ports.admin, "admin port unavailable; serving without it");
            Vec::new()
        }
    };
    tracing::info!(mode = ?cfg.proxy_mode, workload = ?cfg.workload_info, "meshnode proxy starting");
    let rx = stop_on_signal("shutting down: draining connections");
    let admin = meshnode::app::AdminPort {
        listeners: admin,
        logs,
    };
    meshnode::app::run_proxy_with_admin(cfg, listeners, Some(readiness), metrics, admin, rx)
        .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn run_waypoint(cfg: Arc<meshnode::config::WaypointConfig>) -> anyhow::Result<()> {
    let (hbone, readiness, metrics) = meshnode::app::bind_waypoint(&cfg)?;
    tracing::info!(
        waypoint = %cfg.resource_name(),
        identity = %cfg.identity(),
        "meshnode waypoint starting"
    );
    let rx = stop_on_signal("shutting down: draining tunnels");
    meshnode::app::run_waypoint(cfg, hbone, Some(readiness), metrics, rx).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The data plane's multi-threaded runtime.
fn worker_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("meshnode-worker")
        .enable_all()
        .build()
}

/// Raises the open-files limit as ztunnel does at start, saying so.
fn raise_fd_limit() {
    match meshnode::app::raise_fd_limit() {
        Ok((before, after)) if before < after => {
            tracing::info!(before, after, "raised the open files limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
}

async fn run_gateway(cfg: Arc<meshnode::config::GatewayConfig>) -> anyhow::Result<()> {
    let (hbone, readiness, metrics) = meshnode::app::bind_gateway(&cfg)?;
    tracing::info!(
        identity = %cfg.identity(),
        network = %cfg.base.network,
        "meshnode gateway starting"
    );
    let rx = stop_on_signal("shutting down: draining tunnels");
    meshnode::app::run_gateway(cfg, hbone, Some(readiness), metrics, rx).await?;
    tracing::info!("stopped");
    Ok(())
}

/// A shutdown signal that turns true on the first SIGTERM or SIGINT (logging `what`); a second one exits the
/// process at once. Call it inside the runtime.
fn stop_on_signal(what: &'static str) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let mut signals = Signals::new();
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!("{what}");
        let _ = tx.send(true);
        signals.next().await;
        meshnode::logging::exit(1);
    });
    rx
}

/// SIGTERM and SIGINT, listened for from creation on (so a second signal is never missed).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
