//! The bodies the waypoint moves: a request body towards an endpoint ([`UpBody`]; kept in memory when small
//! so a retry can send it again, streamed otherwise) and a response body towards the client ([`RespBody`]:
//! one of ours, or the endpoint's passed through), which counts its bytes, finishes the request's
//! [`RequestLog`] when it ends or is dropped, gives the endpoint connection back to its pool once the
//! endpoint's body has been read to its end, and releases what the request holds of its cluster (request
//! permit, in-flight count) then too.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::metrics::RequestLog;

/// A request body as received, kept for retries when it is small enough.
pub enum Replayable {
    /// The whole body (possibly empty): every try sends it.
    Buffered(Bytes),
    /// A body too long to keep: only the first try can send it.
    Stream(Option<Incoming>),
}

impl Replayable {
    /// Whether a further try can send the body again.
    pub fn can_replay(&self) -> bool {
        matches!(self, Replayable::Buffered(_))
    }

    /// The body for one try; `None` when a streamed body was already taken.
    pub fn for_try(&mut self) -> Option<UpBody> {
        match self {
            Replayable::Buffered(b) if b.is_empty() => Some(UpBody::Full(None)),
            Replayable::Buffered(b) => Some(UpBody::Full(Some(b.clone()))),
            Replayable::Stream(s) => s.take().map(UpBody::Stream),
        }
    }
}

/// A request body towards an endpoint.
pub enum UpBody {
    /// In memory (`None`: empty or already sent).
    Full(Option<Bytes>),
    /// The client's body, passed through.
    Stream(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpBody::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Full(b) => b.is_none(),
            UpBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpBody::Stream(s) => s.size_hint(),
        }
    }
}

/// What runs when an endpoint's response body has been read to its end (the connection is reusable).
pub type OnEnd = Box<dyn FnOnce() + Send>;

enum Source {
    Full(Option<Bytes>),
    Upstream {
        body: Incoming,
        on_end: Option<OnEnd>,
    },
}

/// Anything held until the response body is done with (the cluster's request permit, the endpoint's
/// in-flight count).
pub type Held = Box<dyn std::any::Any + Send>;

/// A response body towards the client.
pub struct RespBody {
    source: Source,
    log: Option<Box<RequestLog>>,
    held: Option<Held>,
    /// The route's timeout, which covers the whole response (Envoy's): past it the stream is reset.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The route's timeout passed while the response body was still arriving.
#[derive(Debug, thiserror::Error)]
#[error("upstream request timeout: the response body did not end within the route's timeout")]
pub struct BodyTimeout;

impl RespBody {
    /// A body of ours (`""`: none).
    pub fn full(body: impl Into<Bytes>, log: Option<Box<RequestLog>>) -> RespBody {
        let b: Bytes = body.into();
        RespBody {
            source: Source::Full((!b.is_empty()).then_some(b)),
            log,
            held: None,
            deadline: None,
        }
    }

    /// An endpoint's body; `on_end` runs once it has been read to its end.
    pub fn upstream(
        body: Incoming,
        on_end: Option<OnEnd>,
        log: Option<Box<RequestLog>>,
    ) -> RespBody {
        let mut r = RespBody {
            source: Source::Upstream { body, on_end },
            log,
            held: None,
            deadline: None,
        };
        if let Source::Upstream { body, on_end } = &mut r.source {
            if body.is_end_stream() {
                if let Some(f) = on_end.take() {
                    f();
                }
            }
        }
        r
    }

    /// Resets the stream if the body has not ended by `at` (the route's timeout).
    pub fn until(mut self, at: tokio::time::Instant) -> RespBody {
        if !self.is_end_stream() {
            self.deadline = Some(Box::pin(tokio::time::sleep_until(at)));
        }
        self
    }

    /// Keeps `held` until the body has ended (or is dropped).
    pub fn holding(mut self, held: Held) -> RespBody {
        self.held = Some(held);
        self
    }

    fn ended(&mut self) {
        self.held = None;
        if let Source::Upstream { on_end, .. } = &mut self.source {
            if let Some(f) = on_end.take() {
                f();
            }
        }
        if let Some(log) = &mut self.log {
            log.finish();
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let me = self.get_mut();
        if let Some(deadline) = &mut me.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                // The endpoint's stream is dropped unfinished (its connection is not reused), the
                // permits released, and the client's stream reset: Envoy's `UT` after headers.
                me.deadline = None;
                me.source = Source::Full(None);
                me.held = None;
                if let Some(log) = &mut me.log {
                    log.flags = "UT";
                    log.finish();
                }
                me.log = None;
                return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
            }
        }
        let frame = match &mut me.source {
            Source::Full(b) => b.take().map(|b| Ok(Frame::data(b))),
            Source::Upstream { body, .. } => ready!(Pin::new(body).poll_frame(cx)),
        };
        match &frame {
            Some(Ok(f)) => {
                if let (Some(d), Some(log)) = (f.data_ref(), &mut me.log) {
                    log.response_bytes += d.len() as u64;
                }
                let end = match &me.source {
                    Source::Full(b) => b.is_none(),
                    Source::Upstream { body, .. } => body.is_end_stream(),
                };
                if end {
                    me.ended();
                }
            }
            Some(Err(_)) => {
                if let Some(log) = &mut me.log {
                    // Envoy's "upstream reset after response started".
                    log.flags = "UPE";
                }
            }
            None => me.ended(),
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Full(b) => b.is_none(),
            Source::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Upstream { body, .. } => body.size_hint(),
        }
    }
}
