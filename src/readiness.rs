//! Readiness (:15021 `GET /healthz/ready`, and the CNI agent's :8000 `GET /readyz`), as ztunnel answers it: `200 ready` once every start-up task
//! has finished, `500 not ready, pending: ...` before.
//!
//! Input: start-up tasks registered by name and marked done by whoever owns them; HTTP/1.1 requests.
//! Output: the answers, through [`crate::admin_http`] (its bounds: 8 KiB, 2 s, a few connections at once).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin_http::Answer;

/// The start-up tasks still pending, each with what it is waiting for, if it has said.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeMap<&'static str, Option<String>>>,
}

/// A pending task; marks itself done when dropped or when [`Task::done`] is called.
pub struct Task {
    ready: Arc<Readiness>,
    name: &'static str,
}

impl Task {
    /// Marks the task done.
    pub fn done(self) {}

    /// Says why the task is not done yet; the not-ready answer shows it after the task's name.
    pub fn waiting_for(&self, why: impl Into<String>) {
        if let Some(slot) = self.ready.pending.lock().get_mut(self.name) {
            *slot = Some(why.into());
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.ready.pending.lock().remove(self.name);
    }
}

impl Readiness {
    /// A new, empty (ready) set.
    pub fn new() -> Arc<Readiness> {
        Arc::default()
    }

    /// Registers a pending task.
    pub fn register(self: &Arc<Self>, name: &'static str) -> Task {
        self.pending.lock().insert(name, None);
        Task {
            ready: self.clone(),
            name,
        }
    }

    /// Pending tasks, each as its name or `name (why)`; empty when ready.
    pub fn pending(&self) -> Vec<String> {
        self.pending
            .lock()
            .iter()
            .map(|(name, why)| match why {
                Some(why) => format!("{name} ({why})"),
                None => (*name).to_owned(),
            })
            .collect()
    }
}

/// Serves readiness on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, ready: Arc<Readiness>, shutdown: watch::Receiver<bool>) {
    crate::admin_http::serve(listener, shutdown, move |method, path| {
        match (method, path) {
            // ztunnel's path, and istio-cni's (`/readyz` on its health port).
            ("GET", "/healthz/ready" | "/readyz") => {
                let pending = ready.pending();
                if pending.is_empty() {
                    Answer::text(200, "OK", "ready\n")
                } else {
                    Answer::text(
                        500,
                        "Internal Server Error",
                        format!("not ready, pending: {}\n", pending.join(", ")),
                    )
                }
            }
            // Liveness: the process answers.
            ("GET", "/healthz") => Answer::text(200, "OK", "alive\n"),
            _ => Answer::not_found(),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_task_shows_why_it_waits_until_it_is_done() {
        let ready = Readiness::new();
        let state = ready.register("agent state");
        let snat = ready.register("kubelet probe SNAT");
        assert_eq!(ready.pending(), ["agent state", "kubelet probe SNAT"]);
        snat.waiting_for("no kubelet process");
        snat.waiting_for("no kubelet process after 2 attempts");
        assert_eq!(
            ready.pending(),
            [
                "agent state",
                "kubelet probe SNAT (no kubelet process after 2 attempts)"
            ]
        );
        state.done();
        drop(snat);
        assert!(ready.pending().is_empty());
    }
}
