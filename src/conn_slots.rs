//! Connection slots that a newcomer may take from an idle holder: how the local listeners (admin ports, the
//! plugin socket, the ZDS socket) stay open to real clients however many idle or slow sockets others hold.
//!
//! Input: each accepted connection ([`Slots::admit`]), and the moment it shows it is a real client
//! ([`Slot::set_busy`]: its request or hello is in). Output: a [`Slot`] held while the connection is served
//! (dropping it frees the slot) and an [`Evicted`] future that resolves when a newer connection took its
//! place, which the connection's task races against its work.
//!
//! At most `max` slots are held. When all are taken, the oldest connection still idle (it has not sent its
//! request or hello) is evicted: a real client sends right after connecting, so it is never the oldest one
//! waiting while others hold sockets open. When every holder is busy, [`WhenAllBusy`] decides: evict the
//! oldest anyway (admin ports: its client does not read its answer) or wait until a slot is freed (plugin
//! and ZDS sockets: a busy connection is a pod being enrolled or a proxy, never to be cut off).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{oneshot, Notify};

/// What a newcomer does when every slot is held by a busy connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenAllBusy {
    /// Evict the oldest connection, busy or not.
    EvictOldest,
    /// Wait until a connection ends.
    Wait,
}

/// The slots of one listener. Cheap to clone; clones share the slots.
#[derive(Clone)]
pub struct Slots {
    shared: Arc<Shared>,
}

struct Shared {
    max: usize,
    when_all_busy: WhenAllBusy,
    held: parking_lot::Mutex<Held>,
    /// Signalled whenever a slot is freed, for an [`Slots::admit`] waiting under [`WhenAllBusy::Wait`].
    freed: Notify,
}

#[derive(Default)]
struct Held {
    /// Oldest first.
    conns: VecDeque<Holder>,
    next_id: u64,
}

struct Holder {
    id: u64,
    busy: Arc<AtomicBool>,
    /// Dropped to evict the connection.
    _evict: oneshot::Sender<()>,
}

impl Slots {
    /// `max` slots (at least one).
    pub fn new(max: usize, when_all_busy: WhenAllBusy) -> Slots {
        Slots {
            shared: Arc::new(Shared {
                max: max.max(1),
                when_all_busy,
                held: parking_lot::Mutex::new(Held::default()),
                freed: Notify::new(),
            }),
        }
    }

    /// A slot for a newly accepted connection: a free one, else the oldest idle connection's (which is
    /// evicted), else per [`WhenAllBusy`].
    pub async fn admit(&self) -> (Slot, Evicted) {
        loop {
            if let Some(admitted) = self.try_admit() {
                return admitted;
            }
            // A slot freed between `try_admit` and here leaves a permit, so this wakes at once.
            self.shared.freed.notified().await;
        }
    }

    fn try_admit(&self) -> Option<(Slot, Evicted)> {
        let mut held = self.shared.held.lock();
        if held.conns.len() >= self.shared.max {
            let victim = held
                .conns
                .iter()
                .position(|h| !h.busy.load(Ordering::Relaxed))
                .or(match self.shared.when_all_busy {
                    WhenAllBusy::EvictOldest => Some(0),
                    WhenAllBusy::Wait => None,
                })?;
            // Dropping its sender resolves that connection's `Evicted`.
            held.conns.remove(victim);
        }
        let id = held.next_id;
        held.next_id += 1;
        let busy = Arc::new(AtomicBool::new(false));
        let (evict, evicted) = oneshot::channel();
        held.conns.push_back(Holder {
            id,
            busy: busy.clone(),
            _evict: evict,
        });
        Some((
            Slot {
                shared: self.shared.clone(),
                id,
                busy,
            },
            Evicted(evicted),
        ))
    }

    /// Slots held now.
    pub fn held(&self) -> usize {
        self.shared.held.lock().conns.len()
    }
}

/// One connection's slot; dropping it frees the slot.
pub struct Slot {
    shared: Arc<Shared>,
    id: u64,
    busy: Arc<AtomicBool>,
}

impl Slot {
    /// The connection is a real client now (its request or hello is in): evicted only under
    /// [`WhenAllBusy::EvictOldest`], and only when no idle one is left.
    pub fn set_busy(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    /// The flag [`Slot::set_busy`] sets, for code that takes a plain `&AtomicBool`.
    pub fn busy_flag(&self) -> &AtomicBool {
        &self.busy
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.held.lock().conns.retain(|h| h.id != self.id);
        self.shared.freed.notify_one();
    }
}

/// Resolves when the connection has been evicted to make room for a newer one.
pub struct Evicted(oneshot::Receiver<()>);

impl Future for Evicted {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Nothing is ever sent: the sender is dropped on eviction.
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn a_newcomer_evicts_the_oldest_idle_connection_and_never_a_busy_one_when_told_to_wait() {
        let slots = Slots::new(3, WhenAllBusy::Wait);
        let (a, mut a_out) = slots.admit().await;
        let (b, mut b_out) = slots.admit().await;
        let (c, mut c_out) = slots.admit().await;
        a.set_busy();
        // Full: the oldest idle one (b) makes room, the busy a stays.
        let (d, mut d_out) = slots.admit().await;
        assert!((&mut b_out).now_or_never().is_some(), "b evicted");
        assert!((&mut a_out).now_or_never().is_none(), "a kept");
        assert_eq!(slots.held(), 3);
        c.set_busy();
        d.set_busy();
        // Every holder busy: the newcomer waits until one ends.
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!((&mut c_out).now_or_never().is_none());
        assert!((&mut d_out).now_or_never().is_none());
        drop(a);
        let (_e, _) = waiting.await.unwrap();
        assert!((&mut c_out).now_or_never().is_none());
        assert!((&mut d_out).now_or_never().is_none());
        assert_eq!(slots.held(), 3);
        drop(b);
    }

    #[tokio::test]
    async fn with_every_holder_busy_the_oldest_is_evicted_when_told_to() {
        let slots = Slots::new(2, WhenAllBusy::EvictOldest);
        let (a, a_out) = slots.admit().await;
        let (b, mut b_out) = slots.admit().await;
        a.set_busy();
        b.set_busy();
        let (_c, _) = slots.admit().await;
        a_out.await;
        assert!((&mut b_out).now_or_never().is_none());
        assert_eq!(slots.held(), 2);
        drop(a);
        assert_eq!(slots.held(), 2, "an evicted slot was already given away");
    }
}
