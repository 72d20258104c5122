//! Spawning a per-connection task whose future is stored once.
//!
//! An async block that captures a future and then awaits it (directly, or inside `select!`) keeps two
//! slots for it, the captured one and the awaited one, so the task is twice the size of what it runs:
//! measured, 5.5 KB instead of 2.5 KB per outbound connection. [`Guarded`] polls the future in place and
//! holds whatever must be released when the task ends (admission permits, a stream count), and
//! [`spawn_guarded`] spawns it, optionally ending it early when a [`CancellationToken`] fires.
//!
//! Input: the connection's future, its guard, the token. Output: a spawned task; the guard is dropped when
//! the task ends, however it ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub use tokio_util::sync::CancellationToken;
use tokio_util::sync::WaitForCancellationFutureOwned;

pin_project_lite::pin_project! {
    /// `fut`, with `guard` dropped when this is, ended early (output `None`) when `cancel` fires.
    pub struct Guarded<F, G> {
        #[pin]
        fut: F,
        #[pin]
        cancel: Option<WaitForCancellationFutureOwned>,
        guard: G,
    }
}

impl<F, G> Guarded<F, G> {
    /// Wraps `fut` so that `guard` lives as long as it does, and it ends when `cancel` (if any) fires.
    pub fn new(fut: F, guard: G, cancel: Option<&CancellationToken>) -> Guarded<F, G> {
        Guarded {
            fut,
            cancel: cancel.map(|t| t.clone().cancelled_owned()),
            guard,
        }
    }
}

impl<F: Future, G> Future for Guarded<F, G> {
    type Output = Option<F::Output>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Some(out));
        }
        match this.cancel.as_pin_mut().map(|c| c.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

/// Spawns `fut` holding `guard`; when `cancel` fires first, the future is dropped (its connection closed).
/// (Not `CancellationToken::run_until_cancelled_owned`: an async fn, it holds its future twice.)
pub fn spawn_guarded<F, G>(fut: F, guard: G, cancel: Option<&CancellationToken>)
where
    F: Future<Output = ()> + Send + 'static,
    G: Send + 'static,
{
    drop(tokio::spawn(Guarded::new(fut, guard, cancel)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn the_guard_is_released_when_the_task_ends_or_is_cancelled() {
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        spawn_guarded(
            async move {
                let _ = rx.await;
            },
            Flag(done.clone()),
            None,
        );
        tokio::task::yield_now().await;
        assert!(!done.load(Ordering::SeqCst), "held while the task runs");
        tx.send(()).unwrap();
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(done.load(Ordering::SeqCst), "released when it ends");

        let cancelled = Arc::new(AtomicBool::new(false));
        let token = CancellationToken::new();
        spawn_guarded(
            std::future::pending(),
            Flag(cancelled.clone()),
            Some(&token),
        );
        tokio::task::yield_now().await;
        assert!(!cancelled.load(Ordering::SeqCst));
        token.cancel();
        for _ in 0..100 {
            if cancelled.load(Ordering::SeqCst) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(cancelled.load(Ordering::SeqCst), "released when cancelled");
    }

    #[test]
    fn a_guarded_future_is_no_bigger_than_the_future_and_its_guard() {
        let fut = async {
            let buf = [0u8; 1000];
            tokio::task::yield_now().await;
            std::hint::black_box(buf);
        };
        let inner = std::mem::size_of_val(&fut);
        let token = CancellationToken::new();
        let guarded = Guarded::new(fut, 0u64, Some(&token));
        let cancel = std::mem::size_of::<WaitForCancellationFutureOwned>();
        assert!(std::mem::size_of_val(&guarded) <= inner + cancel + 16);
    }
}
