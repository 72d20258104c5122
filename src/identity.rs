//! TEMPORARY STUB (replaced by the identity module).
pub mod spiffe;
pub use spiffe::Identity;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct Error;
pub struct WorkloadCert { pub identity: Identity, pub chain: Vec<CertificateDer<'static>>, pub key: PrivateKeyDer<'static>, pub roots: Vec<CertificateDer<'static>>, pub not_before: SystemTime, pub not_after: SystemTime }
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub trait CertSource: Send + Sync + 'static { fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>>; }
pub struct PluginCa;
impl PluginCa { pub fn load(_dir: &Path, _ttl: Duration) -> Result<Self, Error> { Err(Error) } }
impl CertSource for PluginCa { fn fetch<'a>(&'a self, _id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>> { Box::pin(async { Err(Error) }) } }
pub struct BuiltinCa;
impl BuiltinCa { pub fn load_or_create(_dir: &Path, _ttl: Duration) -> Result<Self, Error> { Err(Error) } }
impl CertSource for BuiltinCa { fn fetch<'a>(&'a self, _id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, Error>> { Box::pin(async { Err(Error) }) } }
pub struct CertManager;
impl CertManager { pub fn new(_s: Arc<dyn CertSource>) -> Arc<Self> { Arc::new(CertManager) } pub async fn get(&self, _id: &Identity) -> Result<tokio::sync::watch::Receiver<Arc<WorkloadCert>>, Error> { Err(Error) } }
