//! Body types shared by the server and the upstream client, and the bounded collector.

pub mod coalesce;
mod spliced;
pub mod usage;

pub use spliced::SentSignal;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Empty, Full, Limited, StreamBody};
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

/// Reads a whole body, refusing to hold more than `limit` bytes. `Limited` checks chunked bodies
/// as they arrive, so a client cannot make us buffer more than the limit by omitting the length.
pub async fn collect_limited<B>(body: B, limit: usize) -> Result<Bytes, CollectError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(CollectError::TooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(CollectError::TooLarge),
        Err(e) => Err(CollectError::Read(e)),
    }
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
}
