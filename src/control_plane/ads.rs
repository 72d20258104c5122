//! The delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`),
//! serving `istio.workload.Address` and `istio.security.Authorization` the way istiod serves a ztunnel, and
//! meshnode's own `meshnode.waypoint.Waypoint` to waypoints.
//!
//! Input: [`Snapshot`]s published through a `watch` channel (the file watcher publishes one per good
//! change), and each client's requests. Output, per stream and per subscribed type:
//! - on the first request of a type: every resource the client does not already have at the same version
//!   (`initial_resource_versions`; a version is a hash of the resource's canonical bytes, so it survives a
//!   control-plane restart) and `removed_resources` for names it has that no longer exist. This response is
//!   sent even when empty: the client counts it as its first sync;
//! - on every later snapshot: only the differences (added, changed, removed), if any.
//!
//! Subscriptions to the Istio types are wildcard (ztunnel's default; on-demand `resource_names_subscribe`
//! lists are logged and otherwise ignored). The Waypoint type honours named subscriptions, as a waypoint
//! subscribes to its own `<namespace>/<name>`: a first request naming resources subscribes to those only
//! (none, or `*`: wildcard), later requests add (`resource_names_subscribe`) and drop
//! (`resource_names_unsubscribe`) names; a newly subscribed name that does not exist is answered in
//! `removed_resources`, so the client knows, and is sent once it appears. ACKs are logged at debug, NACKs
//! with their `error_detail` at warn; a NACK changes nothing: later changes are pushed as usual. Unknown
//! type URLs are logged and ignored.
//!
//! What a stream may see is the [`XdsAccess`] the xDS check put on its [`StreamOwner`] (everything without
//! one): a waypoint's identity gets Address and Authorization resources and the Waypoint resources of its
//! own namespace; a subscription to another namespace's Waypoint ends the stream with `PERMISSION_DENIED`,
//! and a wildcard one is limited to its namespace. An east-west gateway's identity gets Address and
//! Authorization resources only.
//!
//! Bounds: at most [`AdsLimits::max_streams`] streams at once and [`AdsLimits::max_streams_per_token`] per
//! caller token (the [`StreamOwner`] the xDS check puts on the request; more get `RESOURCE_EXHAUSTED`), requests up to
//! [`AdsLimits::max_request_bytes`], a [`AdsLimits::queue_depth`]-deep response queue per stream. Snapshots
//! are coalesced by the `watch` channel, never queued, so a slow client costs at most one diff in memory. A
//! client that leaves a response unread for [`AdsLimits::send_timeout`] is dropped: its stream task ends.
//! With [`AdsServer::with_token_check`], a stream whose token goes bad (removed from the mesh file: checked at
//! every snapshot; expired: checked every [`AdsLimits::token_recheck`]) is ended with the check's status.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use prost::Message;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::server::{conn_info, StreamInUse};
use super::tokens::{StreamOwner, XdsAccess};
use super::translate::Resources;
use crate::identity::ca_server::token::TokenDigest;
use crate::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use crate::proto::workload as wl;

/// xDS type URL of workloads and services.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// xDS type URL of L4 authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// xDS type URL of meshnode's waypoint configuration.
pub const WAYPOINT_TYPE: &str = "type.googleapis.com/meshnode.waypoint.Waypoint";

/// The types served, in the order pushes go out (addresses first, as istiod; waypoints last, since they
/// name workloads by uid).
const TYPES: [&str; 3] = [ADDRESS_TYPE, AUTHORIZATION_TYPE, WAYPOINT_TYPE];
/// Responses awaiting an ACK remembered per stream (older ones are forgotten; a late ACK is then logged as
/// unknown, which is harmless).
const MAX_PENDING_NONCES: usize = 64;
/// Longest node id / error detail kept for logs.
const MAX_LOGGED_CHARS: usize = 512;

/// Limits of the ADS server.
#[derive(Debug, Clone)]
pub struct AdsLimits {
    /// Streams served at once.
    pub max_streams: usize,
    /// Streams served at once to the holders of one token.
    pub max_streams_per_token: usize,
    /// How often a stream's token is checked again (it may have expired), besides at every mesh change
    /// (it may have been removed).
    pub token_recheck: Duration,
    /// Responses queued per stream before the stream task waits.
    pub queue_depth: usize,
    /// How long a response may wait for queue room before the client is dropped.
    pub send_timeout: Duration,
    /// Largest request message accepted.
    pub max_request_bytes: usize,
}

impl Default for AdsLimits {
    fn default() -> Self {
        AdsLimits {
            // A node proxy holds one stream; this leaves room for a thousand nodes.
            max_streams: 1024,
            // A node proxy holds one stream; a reconnect may overlap the old stream until keepalive ends it.
            max_streams_per_token: 4,
            // Expiry is checked to the half-minute; a removed token is noticed at once.
            token_recheck: Duration::from_secs(30),
            // One push is one response per type; 16 covers bursts of edits.
            queue_depth: 16,
            send_timeout: Duration::from_secs(30),
            // Requests carry only names and versions: 4 MiB is tonic's default and ample.
            max_request_bytes: 4 * 1024 * 1024,
        }
    }
}

/// One resource, encoded once per snapshot and shared by every stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// A hash of the resource's canonical bytes.
    pub version: String,
    /// The encoded resource.
    pub body: Vec<u8>,
}

/// What the control plane serves at one moment: per type URL, resource name → entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Increases with every published snapshot (sent as `system_version_info`).
    pub generation: u64,
    types: BTreeMap<&'static str, BTreeMap<String, Arc<Entry>>>,
}

impl Snapshot {
    /// Encodes translated resources.
    pub fn new(resources: &Resources, generation: u64) -> Snapshot {
        let addresses = resources
            .addresses
            .iter()
            .map(|(name, addr)| {
                let entry = Entry {
                    version: version_of(&address_canonical_bytes(addr)),
                    body: addr.encode_to_vec(),
                };
                (name.clone(), Arc::new(entry))
            })
            .collect();
        let authorizations = resources
            .authorizations
            .iter()
            .map(|(name, a)| {
                // No map fields: prost's encoding is canonical.
                let body = a.encode_to_vec();
                let entry = Entry {
                    version: version_of(&body),
                    body,
                };
                (name.clone(), Arc::new(entry))
            })
            .collect();
        let waypoints = resources
            .waypoints
            .iter()
            .map(|(name, w)| {
                // No map fields: prost's encoding is canonical.
                let body = w.encode_to_vec();
                let entry = Entry {
                    version: version_of(&body),
                    body,
                };
                (name.clone(), Arc::new(entry))
            })
            .collect();
        Snapshot {
            generation,
            types: BTreeMap::from([
                (ADDRESS_TYPE, addresses),
                (AUTHORIZATION_TYPE, authorizations),
                (WAYPOINT_TYPE, waypoints),
            ]),
        }
    }

    /// The resources of `type_url` (empty for an unknown type).
    pub fn resources(&self, type_url: &str) -> impl Iterator<Item = (&str, &Entry)> {
        self.types
            .get(type_url)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
    }
}

/// Bytes that do not depend on prost's `HashMap` iteration order (`Workload.services`).
fn address_canonical_bytes(addr: &wl::Address) -> Vec<u8> {
    let Some(wl::address::Type::Workload(w)) = &addr.r#type else {
        return addr.encode_to_vec();
    };
    let mut w = w.clone();
    let services: BTreeMap<_, _> = std::mem::take(&mut w.services).into_iter().collect();
    let mut bytes = w.encode_to_vec();
    for (key, ports) in services {
        key.encode_length_delimited(&mut bytes)
            .expect("a Vec grows as needed");
        ports
            .encode_length_delimited(&mut bytes)
            .expect("a Vec grows as needed");
    }
    bytes
}

/// FNV-1a, 64 bits: stable across processes and releases (std's hashers are not), which matters because
/// clients present versions from before a control-plane restart.
fn version_of(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The ADS service. Cheap to clone; wrap it with [`AdsServer::into_service`].
#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    limits: AdsLimits,
    streams: Arc<Semaphore>,
    per_token: Arc<parking_lot::Mutex<HashMap<TokenDigest, usize>>>,
    token_check: Option<TokenCheck>,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer")
            .field("limits", &self.limits)
            .field("token_check", &self.token_check.is_some())
            .finish_non_exhaustive()
    }
}

/// Whether a stream's token is still good (known, not expired, granted the same access); `Err` says why not.
pub type TokenCheck = Arc<dyn Fn(&StreamOwner) -> Result<(), Status> + Send + Sync>;

/// One of a token's stream slots; given back on drop.
struct TokenSlot {
    map: Arc<parking_lot::Mutex<HashMap<TokenDigest, usize>>>,
    owner: TokenDigest,
}

impl TokenSlot {
    fn take(
        map: &Arc<parking_lot::Mutex<HashMap<TokenDigest, usize>>>,
        owner: TokenDigest,
        max: usize,
    ) -> Option<TokenSlot> {
        let mut m = map.lock();
        let n = m.entry(owner).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(TokenSlot {
            map: map.clone(),
            owner,
        })
    }
}

impl Drop for TokenSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock();
        if let Some(n) = m.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.owner);
            }
        }
    }
}

impl AdsServer {
    /// Serves the snapshots published on `snapshots`.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, limits: AdsLimits) -> AdsServer {
        let streams = Arc::new(Semaphore::new(limits.max_streams));
        AdsServer {
            snapshots,
            limits,
            streams,
            per_token: Arc::default(),
            token_check: None,
        }
    }

    /// Ends a stream (with the check's status) once its token fails `check`: checked at every snapshot and
    /// every [`AdsLimits::token_recheck`].
    pub fn with_token_check(mut self, check: TokenCheck) -> AdsServer {
        self.token_check = Some(check);
        self
    }

    /// The tonic service, with the request size limit applied.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        let max = self.limits.max_request_bytes;
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(max)
    }
}

/// The response stream handed to tonic.
pub type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            warn!(
                max = self.limits.max_streams,
                "ADS stream refused: too many streams"
            );
            Status::resource_exhausted("too many xDS streams")
        })?;
        let owner = request.extensions().get::<StreamOwner>().cloned();
        let token_slot = match &owner {
            Some(owner) => Some(
                TokenSlot::take(
                    &self.per_token,
                    owner.token,
                    self.limits.max_streams_per_token,
                )
                .ok_or_else(|| {
                    warn!(
                        token = ?owner.token,
                        max = self.limits.max_streams_per_token,
                        "ADS stream refused: too many streams for this token"
                    );
                    Status::resource_exhausted("too many xDS streams for this token")
                })?,
            ),
            None => None,
        };
        let access = owner
            .as_ref()
            .map_or(XdsAccess::Everything, |o| o.access.clone());
        let conn = conn_info(&request);
        let peer = conn
            .map(|c| c.remote)
            .or_else(|| request.remote_addr())
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let in_use = conn.map(|c| c.stream_opened());
        let (tx, mut rx) = mpsc::channel(self.limits.queue_depth.max(1));
        let stream = AdsStream {
            peer,
            node: String::new(),
            tx,
            limits: self.limits.clone(),
            access,
            subs: HashMap::new(),
            pending: VecDeque::new(),
            next_nonce: 0,
            _permit: permit,
            token_check: self.token_check.clone().zip(owner),
            _token_slot: token_slot,
            _in_use: in_use,
        };
        tokio::spawn(stream.run(request.into_inner(), self.snapshots.clone()));
        let out = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(out)))
    }
}

/// Why a stream task ended early.
enum Stop {
    /// The client is gone or stopped reading.
    ClientGone,
}

/// One client's stream: what it has, what awaits an ACK.
struct AdsStream {
    peer: String,
    node: String,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    limits: AdsLimits,
    /// What the stream may be sent.
    access: XdsAccess,
    /// Per subscribed type: what the client asked for and has.
    subs: HashMap<&'static str, Subscription>,
    /// Nonces sent and not yet (N)ACKed, oldest first.
    pending: VecDeque<(String, &'static str)>,
    next_nonce: u64,
    _permit: OwnedSemaphorePermit,
    /// The check and the token it applies to, for streams opened with a token.
    token_check: Option<(TokenCheck, StreamOwner)>,
    _token_slot: Option<TokenSlot>,
    _in_use: Option<StreamInUse>,
}

impl AdsStream {
    async fn run(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
    ) {
        debug!(peer = %self.peer, "ADS stream opened");
        let mut recheck =
            tokio::time::interval(self.limits.token_recheck.max(Duration::from_millis(10)));
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        let snap = snapshots.borrow().clone();
                        self.on_request(req, &snap).await
                    }
                    Ok(None) => {
                        debug!(peer = %self.peer, node = %self.node, "ADS stream closed by the client");
                        return;
                    }
                    Err(status) => {
                        // Malformed or oversized requests end here: tell the client why.
                        debug!(peer = %self.peer, node = %self.node, error = %status, "ADS stream ended");
                        let _ = self.tx.try_send(Err(status));
                        return;
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        debug!(peer = %self.peer, "snapshot source gone; ending ADS stream");
                        return;
                    }
                    let snap = snapshots.borrow_and_update().clone();
                    match self.token_still_good() {
                        Ok(()) => self.push(&snap).await,
                        Err(status) => self.end_with(status),
                    }
                }
                _ = recheck.tick(), if self.token_check.is_some() => {
                    match self.token_still_good() {
                        Ok(()) => Ok(()),
                        Err(status) => self.end_with(status),
                    }
                }
            };
            if let Err(Stop::ClientGone) = step {
                return;
            }
        }
    }

    fn token_still_good(&self) -> Result<(), Status> {
        match &self.token_check {
            Some((check, owner)) => check(owner),
            None => Ok(()),
        }
    }

    /// Ends the stream with `status` (the token went bad).
    fn end_with(&mut self, status: Status) -> Result<(), Stop> {
        info!(peer = %self.peer, node = %self.node, reason = %status.message(), "ADS stream ended: its token is no longer accepted");
        let _ = self.tx.try_send(Err(status));
        Err(Stop::ClientGone)
    }

    async fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<(), Stop> {
        if let Some(node) = &req.node {
            if self.node.is_empty() && !node.id.is_empty() {
                self.node = truncate(&node.id);
                info!(peer = %self.peer, node = %self.node, "ADS client connected");
            }
        }
        let Some(type_url) = TYPES.iter().copied().find(|t| *t == req.type_url) else {
            warn!(peer = %self.peer, node = %self.node, type_url = %truncate(&req.type_url),
                "ADS request for an unknown type ignored");
            return Ok(());
        };
        let ack = !req.response_nonce.is_empty();
        if ack {
            self.on_ack(type_url, &req);
        }
        let named = type_url == WAYPOINT_TYPE;
        let explicit = req
            .resource_names_subscribe
            .iter()
            .chain(&req.resource_names_unsubscribe)
            .any(|n| n != "*");
        if explicit && !named {
            debug!(peer = %self.peer, node = %self.node, type_url,
                "on-demand subscriptions are not supported; serving everything");
        }
        if named {
            if let Some(name) = req
                .resource_names_subscribe
                .iter()
                .find(|n| *n != "*" && !may_see(&self.access, type_url, n))
            {
                let status = Status::permission_denied(format!(
                    "this caller may not subscribe to {}: a waypoint gets the waypoints of its own namespace",
                    truncate(name)
                ));
                warn!(peer = %self.peer, node = %self.node, type_url, name = %truncate(name),
                    "ADS subscription refused: another namespace's waypoint");
                let _ = self.tx.try_send(Err(status));
                return Err(Stop::ClientGone);
            }
        }
        let changes =
            !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        let newly = match self.subs.get_mut(type_url) {
            Some(sub) if named && changes => sub.change(
                &req.resource_names_subscribe,
                &req.resource_names_unsubscribe,
            ),
            // A plain ACK, or a subscription change on a wildcard stream of an Istio type: nothing to do.
            Some(_) => return Ok(()),
            // An ACK of a type never subscribed to (a confused client): nothing to send.
            None if ack => return Ok(()),
            None => {
                // First request of this type on the stream: the client tells what it already has.
                let sub = Subscription::first(
                    named,
                    &req.resource_names_subscribe,
                    req.initial_resource_versions,
                );
                let newly = sub.names.iter().cloned().collect();
                self.subs.insert(type_url, sub);
                newly
            }
        };
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let first = !sub.first_sent;
        sub.first_sent = true;
        let (resources, mut removed) = diff(type_url, sub, snap, &self.access);
        // Say that newly subscribed names do not exist (yet).
        for name in newly {
            let exists = snap.resources(type_url).any(|(n, _)| n == name);
            if !exists && !removed.contains(&name) {
                removed.push(name);
            }
        }
        if first && resources.is_empty() && removed.is_empty() {
            // The first answer is sent even when empty: the client counts it as its first sync.
        } else if resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        self.send(type_url, snap.generation, resources, removed)
            .await
    }

    fn on_ack(&mut self, type_url: &'static str, req: &DeltaDiscoveryRequest) {
        let known = match self
            .pending
            .iter()
            .position(|(n, _)| *n == req.response_nonce)
        {
            Some(i) => {
                self.pending.remove(i);
                true
            }
            None => false,
        };
        match &req.error_detail {
            Some(err) => warn!(
                peer = %self.peer, node = %self.node, type_url, nonce = %truncate(&req.response_nonce),
                code = err.code, error = %truncate(&err.message), "ADS client rejected a push (NACK)"
            ),
            None if known => debug!(
                peer = %self.peer, node = %self.node, type_url, nonce = %req.response_nonce, "ADS ACK"
            ),
            None => debug!(
                peer = %self.peer, node = %self.node, type_url, nonce = %truncate(&req.response_nonce),
                "ADS ACK for an unknown or old nonce"
            ),
        }
    }

    /// Pushes the differences between what each subscribed type's client has and `snap`.
    async fn push(&mut self, snap: &Snapshot) -> Result<(), Stop> {
        for type_url in TYPES {
            let Some(sub) = self.subs.get_mut(type_url) else {
                continue;
            };
            let (resources, removed) = diff(type_url, sub, snap, &self.access);
            if resources.is_empty() && removed.is_empty() {
                continue;
            }
            self.send(type_url, snap.generation, resources, removed)
                .await?;
        }
        Ok(())
    }

    async fn send(
        &mut self,
        type_url: &'static str,
        generation: u64,
        resources: Vec<Resource>,
        removed: Vec<String>,
    ) -> Result<(), Stop> {
        self.next_nonce += 1;
        let nonce = format!("{generation}-{}", self.next_nonce);
        debug!(peer = %self.peer, node = %self.node, type_url, nonce = %nonce,
            updated = resources.len(), removed = removed.len(), "ADS push");
        let response = DeltaDiscoveryResponse {
            system_version_info: generation.to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            removed_resources: removed,
        };
        match tokio::time::timeout(self.limits.send_timeout, self.tx.send(Ok(response))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Stop::ClientGone),
            Err(_) => {
                warn!(peer = %self.peer, node = %self.node, timeout = ?self.limits.send_timeout,
                    "ADS client is not reading its stream; dropping it");
                return Err(Stop::ClientGone);
            }
        }
        if self.pending.len() == MAX_PENDING_NONCES {
            self.pending.pop_front();
        }
        self.pending.push_back((nonce, type_url));
        Ok(())
    }
}

/// What a client asked for of one type, and what it has.
#[derive(Debug, Default)]
struct Subscription {
    /// Every resource (the stream may see).
    wildcard: bool,
    /// Resources asked for by name (besides a wildcard).
    names: BTreeSet<String>,
    /// Resource names and versions the client has (as far as we sent them).
    have: BTreeMap<String, String>,
    /// Whether the first answer went out.
    first_sent: bool,
}

impl Subscription {
    /// From a type's first request: wildcard for the Istio types; for a named type, the names given (none,
    /// or `*`: wildcard).
    fn first(
        named: bool,
        subscribe: &[String],
        initial: std::collections::HashMap<String, String>,
    ) -> Subscription {
        let names: BTreeSet<String> = if named {
            subscribe.iter().filter(|n| *n != "*").cloned().collect()
        } else {
            BTreeSet::new()
        };
        Subscription {
            wildcard: !named || names.is_empty() || subscribe.iter().any(|n| n == "*"),
            names,
            have: initial.into_iter().collect(),
            first_sent: false,
        }
    }

    /// Applies a later request's changes; returns the names newly subscribed.
    fn change(&mut self, subscribe: &[String], unsubscribe: &[String]) -> Vec<String> {
        let mut newly = Vec::new();
        for n in subscribe {
            if n == "*" {
                self.wildcard = true;
            } else if self.names.insert(n.clone()) {
                newly.push(n.clone());
            }
        }
        for n in unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(n);
            }
        }
        // What the client no longer asked for is forgotten without telling it (it dropped them itself).
        let (wildcard, names) = (self.wildcard, &self.names);
        if !wildcard {
            self.have.retain(|n, _| names.contains(n));
        }
        newly
    }

    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// Whether a stream with `access` may be sent `name` of `type_url`.
fn may_see(access: &XdsAccess, type_url: &str, name: &str) -> bool {
    match access {
        XdsAccess::Everything => true,
        XdsAccess::EastWestGateway => type_url != WAYPOINT_TYPE,
        XdsAccess::Waypoint { namespace } => {
            type_url != WAYPOINT_TYPE
                || name
                    .split_once('/')
                    .is_some_and(|(ns, _)| ns == namespace.as_str())
        }
    }
}

/// Resources of `type_url` in `snap` that `sub` wants and the stream may see, which the client lacks or has
/// at another version, and names the client has that are no longer there; `sub.have` is updated to match.
fn diff(
    type_url: &'static str,
    sub: &mut Subscription,
    snap: &Snapshot,
    access: &XdsAccess,
) -> (Vec<Resource>, Vec<String>) {
    let mut resources = Vec::new();
    let mut current = BTreeMap::new();
    for (name, entry) in snap.resources(type_url) {
        if !sub.wants(name) || !may_see(access, type_url, name) {
            continue;
        }
        if sub.have.get(name) != Some(&entry.version) {
            resources.push(Resource {
                version: entry.version.clone(),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_string(),
                    value: entry.body.clone(),
                }),
                name: name.to_string(),
                ..Resource::default()
            });
        }
        current.insert(name.to_string(), entry.version.clone());
    }
    let removed = sub
        .have
        .keys()
        .filter(|n| !current.contains_key(*n))
        .cloned()
        .collect();
    sub.have = current;
    (resources, removed)
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_LOGGED_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_stops_reading_is_dropped_after_the_send_timeout() {
        let (tx, _rx_never_read) = mpsc::channel(1);
        let mut stream = AdsStream {
            peer: "test".into(),
            node: String::new(),
            tx,
            limits: AdsLimits {
                queue_depth: 1,
                send_timeout: Duration::from_millis(50),
                ..AdsLimits::default()
            },
            access: XdsAccess::Everything,
            subs: HashMap::new(),
            pending: VecDeque::new(),
            next_nonce: 0,
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            token_check: None,
            _token_slot: None,
            _in_use: None,
        };
        assert!(stream.send(ADDRESS_TYPE, 1, vec![], vec![]).await.is_ok());
        let start = tokio::time::Instant::now();
        assert!(matches!(
            stream.send(ADDRESS_TYPE, 2, vec![], vec![]).await,
            Err(Stop::ClientGone)
        ));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn pending_nonces_stay_bounded() {
        let (tx, _rx) = mpsc::channel(1);
        let mut stream = AdsStream {
            peer: "test".into(),
            node: String::new(),
            tx,
            limits: AdsLimits::default(),
            access: XdsAccess::Everything,
            subs: HashMap::new(),
            pending: (0..MAX_PENDING_NONCES)
                .map(|i| (i.to_string(), ADDRESS_TYPE))
                .collect(),
            next_nonce: 0,
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            token_check: None,
            _token_slot: None,
            _in_use: None,
        };
        stream.on_ack(
            ADDRESS_TYPE,
            &DeltaDiscoveryRequest {
                type_url: ADDRESS_TYPE.into(),
                response_nonce: "3".into(),
                ..DeltaDiscoveryRequest::default()
            },
        );
        assert_eq!(stream.pending.len(), MAX_PENDING_NONCES - 1);
    }

    fn waypoints(names: &[&str]) -> Snapshot {
        let mut res = Resources::default();
        for n in names {
            let (ns, name) = n.split_once('/').unwrap();
            res.waypoints.insert(
                n.to_string(),
                crate::proto::waypoint::Waypoint {
                    namespace: ns.into(),
                    name: name.into(),
                    ..Default::default()
                },
            );
        }
        Snapshot::new(&res, 1)
    }

    fn sent(r: &[Resource]) -> Vec<&str> {
        r.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn a_named_waypoint_subscription_gets_only_its_names_and_changes_with_the_client() {
        let snap = waypoints(&["a/w1", "a/w2", "b/w3"]);
        let all = XdsAccess::Everything;
        let mut sub = Subscription::first(true, &["a/w1".into()], Default::default());
        let (r, removed) = diff(WAYPOINT_TYPE, &mut sub, &snap, &all);
        assert_eq!(sent(&r), ["a/w1"]);
        assert!(removed.is_empty());
        // Dropping a name forgets it without a removal; a new name is sent.
        let newly = sub.change(&["a/w2".into()], &["a/w1".into()]);
        assert_eq!(newly, ["a/w2"]);
        let (r, removed) = diff(WAYPOINT_TYPE, &mut sub, &snap, &all);
        assert_eq!(sent(&r), ["a/w2"]);
        assert!(removed.is_empty());
        // No name, or `*`: wildcard. The Istio types are always wildcard.
        assert!(Subscription::first(true, &[], Default::default()).wildcard);
        assert!(
            Subscription::first(true, &["*".into(), "a/w1".into()], Default::default()).wildcard
        );
        assert!(Subscription::first(false, &["x".into()], Default::default()).wildcard);
    }

    #[test]
    fn a_waypoint_identity_sees_the_waypoints_of_its_namespace_and_every_address() {
        let snap = waypoints(&["a/w1", "a/w2", "b/w3"]);
        let access = XdsAccess::Waypoint {
            namespace: "a".into(),
        };
        let mut sub = Subscription::first(true, &[], Default::default());
        let (r, _) = diff(WAYPOINT_TYPE, &mut sub, &snap, &access);
        assert_eq!(sent(&r), ["a/w1", "a/w2"]);
        assert!(may_see(&access, ADDRESS_TYPE, "Kubernetes//Pod/b/x"));
        assert!(may_see(&access, AUTHORIZATION_TYPE, "b/policy"));
        assert!(!may_see(&access, WAYPOINT_TYPE, "b/w3"));
        assert!(!may_see(&access, WAYPOINT_TYPE, "ab/w3"));
        assert!(may_see(&XdsAccess::Everything, WAYPOINT_TYPE, "b/w3"));
    }

    #[test]
    fn an_east_west_gateway_identity_sees_every_address_and_policy_and_no_waypoint() {
        let snap = waypoints(&["a/w1", "istio-system/w2"]);
        let access = XdsAccess::EastWestGateway;
        let mut sub = Subscription::first(true, &[], Default::default());
        let (r, _) = diff(WAYPOINT_TYPE, &mut sub, &snap, &access);
        assert!(r.is_empty(), "{:?}", sent(&r));
        assert!(may_see(&access, ADDRESS_TYPE, "Kubernetes//Pod/b/x"));
        assert!(may_see(&access, AUTHORIZATION_TYPE, "b/policy"));
        assert!(!may_see(&access, WAYPOINT_TYPE, "istio-system/w2"));
    }
}
