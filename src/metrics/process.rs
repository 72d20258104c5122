//! The process families Prometheus' standard process collector exposes and the Istio dashboards read
//! (`process_open_fds`, `process_max_fds`, `process_resident_memory_bytes`, `process_threads`), read from
//! `/proc/self` at each scrape; and `meshnode_log_dropped_lines_total`, the log lines dropped because stdout
//! did not keep up ([`crate::logging::dropped_lines`]).
//!
//! Input: nothing (the running process). Output: a [`Collector`] for a registry; a value that cannot be read
//! is left out of that scrape rather than reported wrong.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Reads this process's figures on every scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| -> Option<i64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            // The directory's own descriptor is among the entries while it is read.
            .map(|d| d.count() as i64 - 1);
        let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| i64::try_from(soft).unwrap_or(i64::MAX));
        let figures = [
            (
                "process_open_fds",
                "Number of open file descriptors.",
                open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max_fds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                field("VmRSS:").map(|kb| kb * 1024),
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                field("Threads:"),
            ),
        ];
        for (name, help, value) in figures {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        let dropped = ConstCounter::new(crate::logging::dropped_lines());
        dropped.encode(encoder.encode_descriptor(
            "meshnode_log_dropped_lines",
            "Log lines dropped because stdout did not keep up.",
            None,
            dropped.metric_type(),
        )?)?;
        Ok(())
    }
}
