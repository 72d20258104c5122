//! The CNI agent's counters and its metrics port (istio-cni's monitoring port, 15014).
//!
//! Input: increments from the agent loop. Output: `GET /metrics` as OpenMetrics text through
//! [`crate::admin_http`]:
//!
//! | name (as scraped) | when |
//! |---|---|
//! | `meshnode_cni_pod_rules_repaired_total` | a captured pod's rules were found missing or different (or an earlier install had failed) and were programmed again |
//! | `meshnode_cni_pod_rules_repair_failures_total` | such a repair failed; the pod keeps its previous rules and is retried with backoff |
//! | `process_open_fds`, `process_max_fds`, `process_resident_memory_bytes`, `process_threads` | read at each scrape |

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// istio-cni's monitoring port (`MONITORING_PORT`).
pub const MONITORING_PORT: u16 = 15014;

/// The agent's counters, registered in their own registry.
pub struct AgentMetrics {
    registry: Registry,
    /// Captured pods whose rules were programmed again after drift or a failed install.
    pub rules_repaired: Counter,
    /// Repairs that failed (the pod keeps its previous rules).
    pub rules_repair_failed: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let rules_repaired = Counter::default();
        let rules_repair_failed = Counter::default();
        let sub = registry.sub_registry_with_prefix("meshnode_cni");
        sub.register(
            "pod_rules_repaired",
            "Captured pods whose redirection rules were found drifted or failed and were programmed again",
            rules_repaired.clone(),
        );
        sub.register(
            "pod_rules_repair_failures",
            "Failed attempts to program a captured pod's rules again (its previous rules stay)",
            rules_repair_failed.clone(),
        );
        registry.register_collector(Box::new(crate::metrics::ProcessCollector));
        AgentMetrics {
            registry,
            rules_repaired,
            rules_repair_failed,
        }
    }
}

impl AgentMetrics {
    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<AgentMetrics>,
    shutdown: watch::Receiver<bool>,
) {
    crate::metrics::serve_encoded(listener, move || metrics.encode(), shutdown).await
}
