//! The request bodies the P/D legs send: a [`Spliced`] rewrite goes out piece by piece, and
//! [`SentSignal`] tells the hand-off when hyper has taken the last byte.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::json_edit::Spliced;

/// Each piece is one frame; hyper gathers them into one `writev`.
impl Body for Spliced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.pop_front().map(|part| Ok(Frame::data(part))))
    }

    fn is_end_stream(&self) -> bool {
        self.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len() as u64)
    }
}

/// A body that reports when hyper has taken its last byte, so the caller knows the request has
/// been handed to the connection in full.
pub struct SentSignal<B = Spliced> {
    inner: B,
    sent: Option<oneshot::Sender<Instant>>,
}

impl<B> SentSignal<B> {
    /// Wraps `body`; the receiver resolves with the time its bytes were handed over (or
    /// fails once the body is dropped unsent).
    pub fn new(body: B) -> (Self, oneshot::Receiver<Instant>) {
        let (tx, rx) = oneshot::channel();
        let body = Self {
            inner: body,
            sent: Some(tx),
        };
        (body, rx)
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for SentSignal<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling once `is_end_stream` is true, so signal on the last frame itself.
        if polled.is_ready() && self.inner.is_end_stream() {
            if let Some(tx) = self.sent.take() {
                let _ = tx.send(Instant::now());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn sent_signal_fires_with_the_last_frame() {
        let (mut body, rx) = SentSignal::new(Spliced::from(Bytes::from_static(b"x")));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"x"));
        rx.await.expect("signalled before the body was dropped");
    }
}
