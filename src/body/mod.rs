//! Body types shared by the server and the upstream client, and the bounded collector.

pub mod coalesce;
mod spliced;
pub mod usage;

pub use spliced::SentSignal;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Empty, Full, StreamBody};
use hyper::body::{Body, Frame};

use crate::json_edit::Spliced;

/// Error type of every body the proxy relays.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One body type for everything we send: buffered rewrites, relayed upstream streams and
/// client streams passed through all fit, so one pooled client serves every leg.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes` in one frame.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A spliced rewrite, sent as its pieces (no copy into one buffer).
pub fn spliced(body: Spliced) -> ProxyBody {
    body.map_err(|never| match never {}).boxed_unsync()
}

/// Relays any hyper-compatible body (e.g. `Incoming`) as a [`ProxyBody`] without buffering.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// `rest` with the frames already read from it put back in front. `hold` lives as long as
/// the body (a task to abort when the client's response ends early, say).
pub fn replay<I>(read: I, rest: ProxyBody, hold: impl Send + 'static) -> ProxyBody
where
    I: IntoIterator<Item = Result<Frame<Bytes>, BoxError>>,
    I::IntoIter: Send + 'static,
{
    let frames = stream::iter(read)
        .chain(BodyStream::new(rest))
        .map(move |frame| {
            let _held = &hold;
            frame
        });
    boxed(StreamBody::new(frames))
}

/// Why a body could not be collected.
#[derive(Debug)]
pub enum CollectError {
    /// The body is longer than the limit.
    TooLarge,
    /// The peer failed while sending it.
    Read(BoxError),
}

/// Reads a whole body, refusing to hold more than `limit` bytes, checked as the data arrives
/// (a client cannot make us buffer more by omitting the length). A body of one frame is kept
/// as it came; a longer one is copied frame by frame into one buffer sized from the declared
/// length, so each frame (a slice of hyper's read buffer) is freed as soon as it is copied:
/// the peak is about the body once, not its frames plus the copy that joins them.
pub async fn collect_limited<B>(body: B, limit: usize) -> Result<Bytes, CollectError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let hint = body.size_hint();
    if hint.lower() > limit as u64 {
        return Err(CollectError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CollectError::Read(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: a JSON request has none worth keeping
        };
        total += data.len();
        if total > limit {
            return Err(CollectError::TooLarge);
        }
        if first.is_none() && joined.is_empty() {
            first = Some(data);
            continue;
        }
        if let Some(head) = first.take() {
            // Data is flowing: reserve what the client declared (never beyond the limit).
            let declared = hint.exact().unwrap_or(hint.lower()).min(limit as u64) as usize;
            joined.reserve(declared.max(head.len() + data.len()));
            joined.extend_from_slice(&head);
        }
        joined.extend_from_slice(&data);
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn collect_limited_refuses_oversized_bodies() {
        let ok = collect_limited(Full::new(Bytes::from_static(b"abcd")), 4).await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"abcd"));
        let too_big = collect_limited(Full::new(Bytes::from_static(b"abcde")), 4).await;
        assert!(matches!(too_big, Err(CollectError::TooLarge)));
    }

    fn frames(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = BoxError> {
        let frames = parts
            .iter()
            .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p))))
            .collect::<Vec<_>>();
        StreamBody::new(stream::iter(frames))
    }

    #[tokio::test]
    async fn collect_limited_joins_frames_in_order_and_counts_them_against_the_limit() {
        let joined = collect_limited(frames(&[b"ab", b"cd", b"e"]), 5).await;
        assert_eq!(joined.unwrap(), Bytes::from_static(b"abcde"));
        let one = collect_limited(frames(&[b"abc"]), 5).await;
        assert_eq!(one.unwrap(), Bytes::from_static(b"abc"));
        // No length declared: the frames alone must trip the limit.
        let too_big = collect_limited(frames(&[b"abc", b"def"]), 5).await;
        assert!(matches!(too_big, Err(CollectError::TooLarge)));
        let empty = collect_limited(frames(&[]), 5).await;
        assert_eq!(empty.unwrap(), Bytes::new());
    }
}
