//! The delta ADS stream: connect, subscribe, apply and answer each response, publish, reconnect.
//!
//! Input: the control-plane target, credentials, node, and a shutdown signal. Output: [`State`]
//! snapshots on the `watch` sender (a waypoint's client: [`WaypointResources`](super::WaypointResources) to its `publish`); the
//! `synced` callback once every subscribed type has been applied.
//!
//! Reconnects follow ztunnel: a failure to connect, or a stream error other than the "routine" ones,
//! doubles the delay (10 ms up to 15 s); routine endings (gRPC `Unknown`, `Cancelled`, `DeadlineExceeded`,
//! `Unavailable` "transport is closing"/"received prior goaway", i.e. istiod's max connection age) retry
//! after 10 ms; a clean end of a stream that answered reconnects at once. A stream that delivered at
//! least one response resets the delay first, so one broken healthy connection does not inherit an old
//! back-off. The held resources survive every reconnect and keep serving.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::cache::{nack_detail, Cache, WaypointFilter};
use super::{Error, Limits, NodeInfo, WaypointPublish, WaypointSubscription};
use crate::config::GrpcTarget;
use crate::grpc;
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Status};
use crate::state::State;

/// First reconnect delay (ztunnel: 10 ms).
const INITIAL_BACKOFF: Duration = Duration::from_millis(10);
/// Longest reconnect delay (ztunnel: 15 s).
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Requests waiting for the transport: the initial requests (two, three for a waypoint) plus ACKs; one ACK
/// per response is sent before the next response is read, so a handful is plenty.
const REQUEST_QUEUE: usize = 8;

/// Where applied responses go.
enum Sink {
    /// The node proxy's state.
    State(watch::Sender<Arc<State>>),
    /// A waypoint's resources.
    Waypoint(WaypointPublish),
}

/// A delta ADS client for workloads, services and policies (and a waypoint's own resource).
pub struct XdsClient {
    target: GrpcTarget,
    creds: grpc::Credentials,
    node: NodeInfo,
    sink: Sink,
    limits: Limits,
    cache: Cache,
    /// Types applied at least once; nothing is published before every subscribed type has been.
    seen: [bool; 3],
    /// ztunnel's `istio_xds_*` families, when the process exposes them.
    metrics: Option<crate::metrics::XdsMetrics>,
}

/// How one stream ended.
enum End {
    /// The server ended the stream cleanly after answering.
    Clean,
    /// Shutdown was requested.
    Shutdown,
}

impl XdsClient {
    /// A client for `target`; snapshots go to `publish`. Nothing happens until [`XdsClient::run`].
    pub fn new(
        target: GrpcTarget,
        creds: grpc::Credentials,
        node: NodeInfo,
        publish: watch::Sender<Arc<State>>,
    ) -> XdsClient {
        let limits = Limits::default();
        XdsClient {
            target,
            creds,
            node,
            sink: Sink::State(publish),
            limits,
            cache: Cache::new(limits.max_resources),
            seen: [false; 3],
            metrics: None,
        }
    }

    /// A client for a waypoint: also subscribes to its own `Waypoint` resource (`sub.name`), validated by
    /// `sub.check`; every new set of resources goes to `sub.publish`.
    pub fn for_waypoint(
        target: GrpcTarget,
        creds: grpc::Credentials,
        node: NodeInfo,
        sub: WaypointSubscription,
    ) -> XdsClient {
        let limits = Limits::default();
        let filter = WaypointFilter {
            name: sub.name,
            check: sub.check,
        };
        XdsClient {
            target,
            creds,
            node,
            sink: Sink::Waypoint(sub.publish),
            limits,
            cache: Cache::for_waypoint(limits.max_resources, filter),
            seen: [false; 3],
            metrics: None,
        }
    }

    /// Counts what it receives and how its streams end in `metrics` (ztunnel's `istio_xds_*`).
    pub fn with_metrics(mut self, metrics: crate::metrics::XdsMetrics) -> XdsClient {
        self.metrics = Some(metrics);
        self
    }

    /// Replaces the default [`Limits`] (before [`XdsClient::run`]; nothing is held yet).
    pub fn with_limits(mut self, limits: Limits) -> XdsClient {
        self.limits = limits;
        self.cache.set_max_resources(limits.max_resources);
        self
    }

    /// Runs until `shutdown` turns true (or its sender is dropped). `synced` is called once, when every
    /// subscribed type has been received and applied the first time; before that nothing is published.
    pub async fn run(mut self, synced: impl FnOnce() + Send, mut shutdown: watch::Receiver<bool>) {
        let mut synced = Some(synced);
        let mut backoff = INITIAL_BACKOFF;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut progressed = false;
            let result = self
                .stream(&mut synced, &mut progressed, &mut shutdown)
                .await;
            if progressed {
                backoff = INITIAL_BACKOFF;
            }
            if let Some(m) = &self.metrics {
                use crate::metrics::XdsTermination as T;
                let why = match &result {
                    Ok(End::Shutdown) => None,
                    Ok(End::Clean) => Some(T::Complete),
                    Err(Error::Stream(status)) if routine(status) => Some(T::Reconnect),
                    Err(Error::Channel(_) | Error::Credentials(_) | Error::Connect { .. }) => {
                        Some(T::ConnectionError)
                    }
                    Err(_) => Some(T::Error),
                };
                if let Some(why) = why {
                    m.terminated(why);
                }
            }
            let delay = match result {
                Ok(End::Shutdown) => return,
                Ok(End::Clean) => {
                    info!("xDS stream ended by the server; reconnecting");
                    Duration::ZERO
                }
                Err(Error::Stream(status)) if routine(&status) => {
                    debug!(%status, "xDS stream ended; reconnecting");
                    INITIAL_BACKOFF
                }
                Err(e) => {
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    warn!(error = %e, retry_in = ?backoff, "xDS stream failed; keeping the last good state");
                    backoff
                }
            };
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown_requested(&mut shutdown) => return,
                }
            }
        }
    }

    /// One stream, from connect to its end.
    async fn stream(
        &mut self,
        synced: &mut Option<impl FnOnce()>,
        progressed: &mut bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<End, Error> {
        let channel = grpc::channel(&self.target).map_err(Error::Channel)?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(REQUEST_QUEUE);
        let node = self.node.to_proto();
        for &kind in self.cache.kinds() {
            let initial = DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: kind.url().to_string(),
                initial_resource_versions: self.cache.versions(kind),
                resource_names_subscribe: self.cache.names(kind),
                ..Default::default()
            };
            debug!(
                type_url = kind.url(),
                held = initial.initial_resource_versions.len(),
                names = ?initial.resource_names_subscribe,
                "xDS subscribe"
            );
            // Cannot fail: the queue is empty and longer than three.
            tx.try_send(initial).map_err(|_| Error::RequestsClosed)?;
        }
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|req| (req, rx))
        });
        let request = self.creds.request(outbound).map_err(Error::Credentials)?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(self.limits.max_message_size);
        let opened = tokio::select! {
            r = client.delta_aggregated_resources(request) => r,
            _ = shutdown_requested(shutdown) => return Ok(End::Shutdown),
        };
        let mut responses = opened
            .map_err(|status| Error::Connect {
                address: self.target.address.clone(),
                status,
            })?
            .into_inner();
        info!(address = %self.target.address, "xDS stream open");
        loop {
            let msg = tokio::select! {
                m = responses.message() => m,
                _ = shutdown_requested(shutdown) => return Ok(End::Shutdown),
            };
            let Some(resp) = msg.map_err(Error::Stream)? else {
                return if *progressed {
                    Ok(End::Clean)
                } else {
                    Err(Error::EndedEarly)
                };
            };
            *progressed = true;
            if let Some(m) = &self.metrics {
                m.message(&resp.type_url, prost::Message::encoded_len(&resp) as u64);
            }
            let answer = self.handle(resp, synced);
            tokio::select! {
                r = tx.send(answer) => r.map_err(|_| Error::RequestsClosed)?,
                _ = shutdown_requested(shutdown) => return Ok(End::Shutdown),
            }
        }
    }

    /// Applies one response, publishes, and returns the ACK or NACK.
    fn handle(
        &mut self,
        resp: DeltaDiscoveryResponse,
        synced: &mut Option<impl FnOnce()>,
    ) -> DeltaDiscoveryRequest {
        let type_url = resp.type_url.clone();
        let nonce = resp.nonce.clone();
        let (resources, removals) = (resp.resources.len(), resp.removed_resources.len());
        let error = match self.cache.apply(resp) {
            Ok(applied) => {
                info!(
                    type_url,
                    resources,
                    removals,
                    updated = applied.updated,
                    removed = applied.removed,
                    stand_ins = applied.stand_ins,
                    rejected = applied.rejected.len(),
                    "xDS response applied"
                );
                self.seen[applied.kind as usize] = true;
                let all_seen = self.cache.kinds().iter().all(|k| self.seen[*k as usize]);
                if all_seen {
                    match &mut self.sink {
                        Sink::State(tx) => {
                            tx.send_replace(Arc::new(applied.state));
                        }
                        Sink::Waypoint(publish) => publish(self.cache.waypoint_resources()),
                    }
                    if let Some(f) = synced.take() {
                        info!("xDS synced: every subscribed type received");
                        f();
                    }
                }
                (!applied.rejected.is_empty()).then(|| nack_detail(&applied.rejected))
            }
            Err(e) => Some(super::cache::truncate(e.to_string())),
        };
        if let Some(message) = &error {
            warn!(type_url, nonce, error = %message, "xDS NACK");
        }
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail: error.map(|message| Status {
                message,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Stream endings that are part of normal operation (istiod closing old connections).
fn routine(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => true,
        Code::Unavailable => {
            status.message().contains("transport is closing")
                || status.message().contains("received prior goaway")
        }
        _ => false,
    }
}

/// Resolves when shutdown is requested: the value turns true or the sender is gone.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
