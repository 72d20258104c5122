//! The `meshnode sandbox` command line: parses the subcommand and runs it, turning errors into a message on
//! stderr and an exit code (0 all well, 1 a tutorial check did not see what it expected or a component is
//! not healthy, 2 the command could not be done, 130 interrupted).
//!
//! Input: the parsed [`SandboxArgs`]. Output: the process exit code.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::{apps, Error, Layout, Options, DEFAULT_NAME, DEFAULT_ROOT};

/// `meshnode sandbox [--name N] [--keep] [--multi-network] [COMMAND]`.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// The sandbox's name: prefix of its network namespaces (several sandboxes can coexist).
    #[arg(long, global = true, env = "MESHNODE_SANDBOX_NAME", default_value = DEFAULT_NAME)]
    pub name: String,
    /// Where sandboxes keep their state.
    #[arg(long, global = true, env = "MESHNODE_SANDBOX_DIR", default_value = DEFAULT_ROOT)]
    pub dir: PathBuf,
    /// Without a command: leave the sandbox running after the tutorial.
    #[arg(long)]
    pub keep: bool,
    /// Without a command (or with `up`): node1 on network1 and node2 on network2, joined only through
    /// an east-west gateway per network (Istio ambient multi-network).
    #[arg(long)]
    pub multi_network: bool,
    /// What to do; without one, build the sandbox, run the tutorial and remove it.
    #[command(subcommand)]
    pub command: Option<SandboxCommand>,
}

/// The sandbox's subcommands.
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Build the sandbox and leave it running.
    Up {
        /// node1 on network1 and node2 on network2, joined only through an east-west gateway per
        /// network (Istio ambient multi-network).
        #[arg(long)]
        multi_network: bool,
    },
    /// Remove the sandbox: every process, namespace, rule, socket and file it made (also after a crash).
    Down,
    /// Show nodes, components, pods (and whether they are captured), services and Istio objects.
    Status,
    /// Run a command inside a pod's network namespace, with service names in /etc/hosts
    /// (e.g. `sandbox exec sleep -- curl -s http://productpage:9080/productpage`).
    Exec {
        /// The pod: `name`, `namespace/name`, or an unambiguous prefix (`productpage`).
        pod: String,
        /// The command and its arguments (default: /bin/sh).
        #[arg(last = true)]
        command: Vec<OsString>,
    },
    /// Apply Istio YAML live: AuthorizationPolicy, PeerAuthentication, Namespace labels (like kubectl apply -f).
    Apply {
        /// The manifest (`-` for stdin).
        file: PathBuf,
    },
    /// Delete the AuthorizationPolicies and PeerAuthentications a manifest names (like kubectl delete -f).
    Delete {
        /// The manifest (`-` for stdin).
        file: PathBuf,
    },
    /// Swap each node's proxy (or one node's) for a new process while traffic runs, as a DaemonSet rolling
    /// update does: open connections are handed over to the new proxy, not reset.
    Upgrade {
        /// Only this node (`node1`, `node2`).
        #[arg(long)]
        node: Option<String>,
        /// A restart instead: stop the old proxy first, then start the new one (no overlap, as a
        /// container restart); the CNI agent holds the open connections meanwhile.
        #[arg(long)]
        restart: bool,
    },
    /// Internal: run COMMAND inside the network namespace NETNS (what the sandbox starts components with).
    #[command(hide = true)]
    Enter {
        /// Path of the namespace.
        netns: PathBuf,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Internal: a bookinfo app (what each sandbox pod runs), or the outside world's server.
    #[command(hide = true)]
    App {
        /// productpage, details, ratings, reviews-v1, reviews-v2, reviews-v3, or external (the outside world).
        app: String,
        /// Where to listen.
        #[arg(long)]
        listen: SocketAddr,
        /// NAME=IP:PORT of a service the app calls.
        #[arg(long = "upstream")]
        upstreams: Vec<String>,
    },
}

/// Runs the command; returns the exit code.
pub fn main(args: SandboxArgs) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshnode sandbox: {e}");
            2
        }
    }
}

fn run(args: SandboxArgs) -> Result<i32, Error> {
    // The internal commands come first: they run inside namespaces and need no options.
    match args.command {
        Some(SandboxCommand::Enter { netns, command }) => {
            return Err(Error::Refused(
                super::procs::enter(&netns, None, &command).to_string(),
            ));
        }
        Some(SandboxCommand::App {
            app,
            listen,
            upstreams,
        }) => {
            let mut map = std::collections::BTreeMap::new();
            for u in upstreams {
                let (name, addr) = u
                    .split_once('=')
                    .and_then(|(n, a)| Some((n.to_string(), a.parse::<SocketAddr>().ok()?)))
                    .ok_or_else(|| {
                        Error::Refused(format!("--upstream {u:?}: expected NAME=IP:PORT"))
                    })?;
                map.insert(name, addr);
            }
            let app = app
                .parse::<apps::App>()
                .map_err(|e| Error::Refused(format!("app {app:?}: {e}")))?;
            let cfg = apps::AppConfig {
                app,
                listen,
                upstreams: map,
            };
            apps::run(cfg).map_err(|e| Error::Refused(e.to_string()))?;
            return Ok(0);
        }
        _ => {}
    }
    if args.multi_network && !matches!(args.command, None | Some(SandboxCommand::Up { .. })) {
        return Err(Error::Refused(
            "--multi-network is chosen when the sandbox is built (`sandbox --multi-network` or `sandbox up \
             --multi-network`); the other commands work on the sandbox as it was built"
                .into(),
        ));
    }
    let opts = Options::new(&args.name, &args.dir)?;
    let mut out = std::io::stdout();
    let layout = |also: bool| {
        if args.multi_network || also {
            Layout::TwoNetworks
        } else {
            Layout::OneNetwork
        }
    };
    match args.command {
        None => {
            let stop = interrupt_flag();
            let all_ok = super::scenario::run(&opts, args.keep, layout(false), &mut out, &stop)?;
            Ok(if stop.load(Ordering::Relaxed) {
                130
            } else if all_ok {
                0
            } else {
                1
            })
        }
        Some(SandboxCommand::Up { multi_network }) => {
            super::up(&opts, layout(multi_network), &mut out)?;
            println!(
                "\nsandbox {:?} is up. Try:\n  meshnode sandbox status\n  meshnode sandbox exec sleep -- curl -s http://productpage:9080/productpage\n  meshnode sandbox apply policy.yaml\n  meshnode sandbox down",
                opts.name
            );
            Ok(0)
        }
        Some(SandboxCommand::Down) => {
            match super::down(&opts, &mut out)? {
                Some(r) => println!(
                    "sandbox {:?} removed ({} processes stopped, {} network namespaces deleted)",
                    opts.name, r.processes, r.namespaces
                ),
                None => println!("no sandbox {:?}: nothing to remove", opts.name),
            }
            Ok(0)
        }
        Some(SandboxCommand::Status) => Ok(if super::status(&opts, &mut out)? {
            0
        } else {
            1
        }),
        Some(SandboxCommand::Exec { pod, command }) => {
            let command = if command.is_empty() {
                vec![OsString::from("/bin/sh")]
            } else {
                command
            };
            Err(super::exec(&opts, &pod, &command))
        }
        Some(SandboxCommand::Apply { file }) => {
            super::apply(&opts, &file, super::apply::Verb::Apply, &mut out).map(|()| 0)
        }
        Some(SandboxCommand::Delete { file }) => {
            super::apply(&opts, &file, super::apply::Verb::Delete, &mut out).map(|()| 0)
        }
        Some(SandboxCommand::Upgrade { node, restart }) => Ok(
            if super::upgrade::upgrade(&opts, node.as_deref(), restart, &mut out)? {
                0
            } else {
                1
            },
        ),
        Some(SandboxCommand::Enter { .. } | SandboxCommand::App { .. }) => {
            unreachable!("handled above")
        }
    }
}

/// A flag set by SIGINT or SIGTERM (handled on a small runtime thread; the handlers are not inherited by
/// the components the sandbox starts, which reset them on exec).
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = std::thread::Builder::new()
        .name("meshnode-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                eprintln!("\ninterrupted: finishing the current check, then removing the sandbox");
                f.store(true, Ordering::Relaxed);
            });
        });
    flag
}
