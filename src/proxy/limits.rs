//! Process-wide admission: how many connections the whole process handles at once, and how many handshakes
//! one source address may have in progress on :15008.
//!
//! Input: the two bounds from config (`MESHNODE_MAX_CONNECTIONS_TOTAL`,
//! `MESHNODE_MAX_HANDSHAKES_PER_SOURCE`). Output: permits. Every accept loop of every proxy in the process
//! takes a [`ConnectionPermit`] for each connection it accepts, before handling it; while it waits for one,
//! that listener accepts nothing more, so further connections wait in the kernel backlog (an idle listener
//! holds no permit). The HBONE inbound path holds a [`HandshakePermit`] from accept until TLS and the
//! HTTP/2 preface are done; a source over its bound is reset at once. One [`Admission`] is shared by every
//! proxy built from the same `Arc<Config>`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The process's connection counters.
pub struct Admission {
    total: Arc<Semaphore>,
    max_total: usize,
    /// Handshakes in progress per source address. An entry exists only while its count is above zero, so
    /// the map never holds more entries than there are connections (bounded by `max_total`).
    handshakes: Mutex<HashMap<IpAddr, usize>>,
    max_per_source: usize,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("open", &self.open())
            .field("max_total", &self.max_total)
            .field("max_per_source", &self.max_per_source)
            .finish()
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    _permit: OwnedSemaphorePermit,
}

/// One handshake in progress from a source address; dropping it (handshake done or failed) frees its place.
#[derive(Debug)]
pub struct HandshakePermit {
    admission: Arc<Admission>,
    src: IpAddr,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut map = self.admission.handshakes.lock();
        if let Some(n) = map.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.src);
            }
        }
    }
}

impl Admission {
    /// Counters admitting `max_total` connections, and `max_per_source` handshakes per source address.
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Admission> {
        let max_total = max_total.min(Semaphore::MAX_PERMITS);
        Arc::new(Admission {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            handshakes: Mutex::default(),
            max_per_source,
        })
    }

    /// Waits for room for one more connection in the process.
    pub async fn connection(&self) -> ConnectionPermit {
        let permit = self.total.clone().acquire_owned().await;
        ConnectionPermit {
            _permit: permit.expect("the semaphore is never closed"),
        }
    }

    /// Room for one more handshake from `src`, or `None` when it already has its share in progress.
    pub fn handshake(self: &Arc<Self>, src: IpAddr) -> Option<HandshakePermit> {
        let mut map = self.handshakes.lock();
        let n = map.entry(src).or_insert(0);
        if *n >= self.max_per_source {
            return None;
        }
        *n += 1;
        Some(HandshakePermit {
            admission: self.clone(),
            src,
        })
    }

    /// Connections the process handles right now (all proxies, all listeners).
    pub fn open(&self) -> usize {
        self.max_total - self.total.available_permits()
    }

    /// Handshakes in progress from `src`.
    pub fn handshakes_from(&self, src: IpAddr) -> usize {
        self.handshakes.lock().get(&src).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn permits_are_given_back_when_dropped() {
        let a = Admission::new(2, 1);
        let one = a.connection().await;
        let _two = a.connection().await;
        assert_eq!(a.open(), 2);
        let third =
            tokio::time::timeout(std::time::Duration::from_millis(50), a.connection()).await;
        assert!(third.is_err(), "a third connection was admitted");
        drop(one);
        let _third = a.connection().await;

        let src: IpAddr = [10, 0, 0, 1].into();
        let h = a.handshake(src).expect("first handshake");
        assert!(
            a.handshake(src).is_none(),
            "second handshake from one source"
        );
        assert!(a.handshake([10, 0, 0, 2].into()).is_some());
        drop(h);
        assert_eq!(a.handshakes_from(src), 0);
        assert!(
            a.handshakes.lock().is_empty(),
            "entries outlive their handshakes"
        );
        assert!(a.handshake(src).is_some());
    }
}
