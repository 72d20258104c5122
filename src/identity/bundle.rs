//! `TrustBundle`: the configured mesh roots (`CA_ROOT_CA`), trusted for workload peers together with the
//! roots of each CA answer.
//!
//! Input: the [`RootCa`] of the CA target — a PEM file (what istiod mounts as `root-cert.pem`, holding
//! every root of the mesh while a root rotates), PEM text, or `SYSTEM`. Output: the current list of root
//! certificates on a `watch` channel; [`super::CertManager`] adds them to every [`super::WorkloadCert`]'s
//! roots, so a peer whose certificate comes from another root of the bundle is accepted even while our
//! own CA answer names only one root. Without this a root rotation splits the mesh for a certificate
//! lifetime.
//!
//! A file is re-read every [`POLL_INTERVAL`]; a good new version replaces the list, an unreadable or bad
//! one is logged and the last good list stays. A file that does not exist yet is an empty bundle until it
//! appears. `SYSTEM` gives no bundle: the operating system's public roots verify the CA server, never
//! workload peers. Bad content at start is an [`Error`] naming the file and the certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use super::signer::parse_x509;
use super::Error;
use crate::config::RootCa;

/// How often a bundle file is checked for changes (ztunnel debounces its root-file watch by 2 s).
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The name used in errors for a bundle given inline as PEM text.
const INLINE: &str = "CA_ROOT_CA (inline PEM)";

/// Root certificates, shared.
type Roots = Arc<Vec<CertificateDer<'static>>>;

/// The configured root bundle; clones share one channel.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    rx: watch::Receiver<Roots>,
    /// Keeps a fixed bundle's channel open (a file bundle's sender lives in its poll task).
    _fixed: Option<Arc<watch::Sender<Roots>>>,
}

impl TrustBundle {
    /// A bundle that never changes.
    pub fn fixed(roots: Vec<CertificateDer<'static>>) -> TrustBundle {
        let (tx, rx) = watch::channel(Arc::new(roots));
        TrustBundle {
            rx,
            _fixed: Some(Arc::new(tx)),
        }
    }

    /// The bundle `root` names: `None` for `SYSTEM`; inline PEM as a fixed bundle; a file read now and then
    /// every [`POLL_INTERVAL`] (polling needs a tokio runtime; without one the file is read once).
    pub fn from_root_ca(root: &RootCa) -> Result<Option<TrustBundle>, Error> {
        match root {
            RootCa::System => Ok(None),
            RootCa::Pem(text) => Ok(Some(Self::fixed(parse(
                Path::new(INLINE),
                text.as_bytes(),
            )?))),
            RootCa::File(path) => Self::watch_file(path.clone(), POLL_INTERVAL).map(Some),
        }
    }

    /// A bundle read from `path` now and re-read every `interval`.
    pub fn watch_file(path: PathBuf, interval: Duration) -> Result<TrustBundle, Error> {
        let (bytes, roots) = match crate::file_watch::read_bounded_sync(&path) {
            Ok((bytes, seen)) => (seen, parse(&path, &bytes)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "root bundle file does not exist yet; only the CA answers' roots are trusted until it appears");
                (crate::file_watch::Seen::of(&[]), Vec::new())
            }
            Err(source) => return Err(Error::Read { path, source }),
        };
        tracing::info!(path = %path.display(), roots = roots.len(), "trusting the configured root bundle for workload peers");
        let (tx, rx) = watch::channel(Arc::new(roots));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let parse_path = path.clone();
                let shown = path.clone();
                rt.spawn(crate::file_watch::poll(
                    path,
                    interval,
                    bytes,
                    tx,
                    move |b| parse(&parse_path, b),
                    move |roots: &Vec<CertificateDer<'static>>| {
                        tracing::info!(path = %shown.display(), roots = roots.len(), "root bundle reloaded")
                    },
                ));
                Ok(TrustBundle { rx, _fixed: None })
            }
            Err(_) => {
                tracing::warn!(path = %path.display(), "no async runtime: the root bundle is read once and not reloaded");
                Ok(TrustBundle {
                    rx,
                    _fixed: Some(Arc::new(tx)),
                })
            }
        }
    }

    /// A bundle following `rx` (tests drive it by hand).
    #[cfg(test)]
    pub(crate) fn from_receiver(rx: watch::Receiver<Roots>) -> TrustBundle {
        TrustBundle { rx, _fixed: None }
    }

    /// The roots now.
    pub fn roots(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.rx.borrow().clone()
    }

    /// Waits until the roots change (forever if they cannot change any more).
    pub(crate) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Parses a bundle: one or more PEM certificates, each valid X.509 and usable as a trust anchor.
fn parse(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let roots = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            path: path.to_owned(),
            source,
        })?;
    if roots.is_empty() {
        return Err(Error::NoPemSection {
            path: path.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    for (index, root) in roots.iter().enumerate() {
        parse_x509(root).map_err(|source| Error::Certificate {
            path: path.to_owned(),
            index,
            source,
        })?;
        webpki::anchor_from_trusted_cert(root).map_err(|source| Error::TrustAnchor {
            path: path.to_owned(),
            index,
            source,
        })?;
    }
    Ok(roots)
}
