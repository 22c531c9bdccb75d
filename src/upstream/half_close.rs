//! Prefill connections that can be half-closed from outside hyper.
//!
//! When a client leaves during its prefill, the prefiller must stop (vLLM aborts a request
//! whose connection reaches EOF) but a reply already on its way must still be read: it means
//! KV blocks are pinned and a decode has to release them. Closing the whole connection loses
//! that reply; shutting down only our sending side (`SHUT_WR`) tells vLLM to stop and keeps
//! the reply readable. hyper owns the socket, so each prefill connection carries a duplicate
//! of its descriptor in its [`Connected`] extras, reachable through `capture_connection`.

use std::future::Future;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Shuts down the sending side of one upstream connection.
#[derive(Clone, Debug)]
pub struct WriteShutdown(Arc<std::net::TcpStream>);

impl WriteShutdown {
    /// Sends FIN; reading goes on. Safe on a socket already closed (the duplicate descriptor
    /// keeps it from being reused for another connection).
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(Shutdown::Write);
    }
}

/// A TCP connection with its [`WriteShutdown`].
pub struct Tracked {
    io: TokioIo<TcpStream>,
    handle: WriteShutdown,
}

impl Connection for Tracked {
    fn connected(&self) -> Connected {
        self.io.connected().extra(self.handle.clone())
    }
}

impl Read for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// [`HttpConnector`], with each connection [`Tracked`].
#[derive(Clone)]
pub struct TrackingConnector(pub HttpConnector);

impl Service<Uri> for TrackingConnector {
    type Response = Tracked;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Tracked, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            let dup = io.inner().as_fd().try_clone_to_owned()?;
            Ok(Tracked {
                io,
                handle: WriteShutdown(Arc::new(std::net::TcpStream::from(dup))),
            })
        })
    }
}

/// Half-closes the connection a request went out on (see the module doc) and keeps it from
/// being pooled again. False if the request had no tracked connection yet.
pub fn shut_down_sending(
    captured: &hyper_util::client::legacy::connect::CaptureConnection,
) -> bool {
    let connection = captured.connection_metadata();
    let Some(connected) = connection.as_ref() else {
        return false;
    };
    connected.poison();
    let mut extras = http::Extensions::new();
    connected.get_extras(&mut extras);
    match extras.get::<WriteShutdown>() {
        Some(handle) => {
            handle.shutdown();
            true
        }
        None => false,
    }
}
