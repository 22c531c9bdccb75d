//! Merges the upstream body frames that are ready together into one, so a burst of SSE events
//! reaches the client in one write instead of one write (and one client read) per event.
//!
//! hyper hands an upstream body over one chunk at a time: the client connection task decodes a
//! chunk, passes it through a channel that holds one, and waits for it to be taken. Relayed as
//! is, every chunk becomes its own `writev` on the client socket even when the decoder sent 64
//! events in one segment; the syscalls, not the proxying, were most of the sidecar's CPU per
//! stream. So after taking a chunk we yield to the scheduler, which lets the connection task
//! hand over the next one if it already has it, and only when [`IDLE_YIELDS`] yields in a row
//! bring nothing new (or enough has gathered) is the batch returned. A lone event waits that
//! many scheduler passes, never for more data to arrive from the network.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};

/// Frames merged past this size are returned at once, bounding the copy and the batch.
const MAX_BATCH: usize = 64 * 1024;

/// Scheduler passes to wait for the next chunk before returning the batch. Measured with
/// hyper 1.x: the next chunk of a buffered burst arrives after the second pass, never the
/// first (one pass merged nothing; three merged no more than two). Too few only means more
/// writes, never a stalled stream.
const IDLE_YIELDS: u8 = 2;

/// See the module documentation.
pub struct Coalesce<B: Body> {
    inner: B,
    /// The first chunk of a batch, kept as is so a batch of one is never copied.
    first: Option<Bytes>,
    /// The batch once a second chunk joined the first.
    merged: BytesMut,
    /// A trailers frame or an error that came after the batch: returned next.
    after: Option<Result<Frame<Bytes>, B::Error>>,
    /// The inner body ended while a batch was held.
    inner_done: bool,
    /// Yields in a row that brought no new chunk.
    yielded: u8,
}

impl<B: Body<Data = Bytes>> Coalesce<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            first: None,
            merged: BytesMut::new(),
            after: None,
            inner_done: false,
            yielded: 0,
        }
    }

    fn held(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.merged.len()
    }

    fn push(&mut self, data: Bytes) {
        match self.first.take() {
            None if self.merged.is_empty() => self.first = Some(data),
            first => {
                if let Some(first) = first {
                    self.merged.reserve(first.len() + data.len());
                    self.merged.extend_from_slice(&first);
                }
                self.merged.extend_from_slice(&data);
            }
        }
    }

    fn take_batch(&mut self) -> Option<Frame<Bytes>> {
        self.yielded = 0;
        if let Some(first) = self.first.take() {
            return Some(Frame::data(first));
        }
        if self.merged.is_empty() {
            return None;
        }
        Some(Frame::data(self.merged.split().freeze()))
    }
}

impl<B> Body for Coalesce<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.after.is_some() || this.inner_done {
                if let Some(batch) = this.take_batch() {
                    return Poll::Ready(Some(Ok(batch)));
                }
                return Poll::Ready(this.after.take());
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.yielded = 0;
                        if !data.is_empty() {
                            this.push(data);
                        }
                        if this.held() >= MAX_BATCH || this.inner.is_end_stream() {
                            if let Some(batch) = this.take_batch() {
                                return Poll::Ready(Some(Ok(batch)));
                            }
                        }
                    }
                    Err(frame) => this.after = Some(Ok(frame)),
                },
                Poll::Ready(Some(Err(e))) => this.after = Some(Err(e)),
                Poll::Ready(None) => this.inner_done = true,
                Poll::Pending if this.held() == 0 => return Poll::Pending,
                Poll::Pending if this.yielded < IDLE_YIELDS => {
                    // Let the connection task run once; we are polled again right after.
                    this.yielded += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => {
                    let batch = this.take_batch();
                    return Poll::Ready(batch.map(Ok));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held() == 0 && self.after.is_none() && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held() as u64;
        if self.inner_done {
            return SizeHint::with_exact(held);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    fn frames(parts: &[&'static str]) -> Vec<Result<Frame<Bytes>, Infallible>> {
        parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect()
    }

    #[tokio::test]
    async fn ready_frames_go_out_as_one() {
        let inner = StreamBody::new(futures_util::stream::iter(frames(&["a", "b", "c"])));
        let mut body = Coalesce::new(inner);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, Bytes::from_static(b"abc"));
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn trailers_follow_the_batch() {
        let mut items = frames(&["x", "y"]);
        items.push(Ok(Frame::trailers(http::HeaderMap::new())));
        let inner = StreamBody::new(futures_util::stream::iter(items));
        let mut body = Coalesce::new(inner);
        let data = body.frame().await.unwrap().unwrap();
        assert_eq!(data.into_data().unwrap(), Bytes::from_static(b"xy"));
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_lone_chunk_is_not_held_for_more() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut body = Coalesce::new(StreamBody::new(stream));
        tx.try_send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .unwrap();
        // The sender stays open: the chunk must still come out.
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, Bytes::from_static(b"one"));
        drop(tx);
        assert!(body.frame().await.is_none());
    }
}
