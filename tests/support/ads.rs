//! A static delta ADS server on loopback (plain HTTP/2): answers each subscription once with every resource
//! it holds of that type, keeps the stream open, and records what clients asked and answered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use meshnode::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use meshnode::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use parking_lot::Mutex;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// What the server serves, and what it was told.
#[derive(Default)]
pub struct StaticAds {
    /// type URL → resources.
    pub resources: HashMap<String, Vec<Resource>>,
    /// Every request received (initial subscriptions, ACKs, NACKs).
    pub requests: Mutex<Vec<DeltaDiscoveryRequest>>,
}

/// A resource `name` of type `type_url` holding `msg`.
pub fn resource(name: &str, type_url: &str, msg: &impl Message) -> Resource {
    Resource {
        name: name.into(),
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value: msg.encode_to_vec(),
        }),
        ..Default::default()
    }
}

struct Service(Arc<StaticAds>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut requests = request.into_inner();
        let ads = self.0.clone();
        tokio::spawn(async move {
            let mut nonce = 0u32;
            while let Ok(Some(req)) = requests.message().await {
                let initial = req.response_nonce.is_empty();
                let type_url = req.type_url.clone();
                ads.requests.lock().push(req);
                if !initial {
                    continue;
                }
                nonce += 1;
                let resp = DeltaDiscoveryResponse {
                    type_url: type_url.clone(),
                    nonce: nonce.to_string(),
                    resources: ads.resources.get(&type_url).cloned().unwrap_or_default(),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves `ads` on `bind` (port 0: any); returns the address.
pub async fn start_ads(ads: Arc<StaticAds>, bind: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Service(ads)))
            .serve_with_incoming(incoming),
    );
    addr
}
