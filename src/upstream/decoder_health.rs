//! Whether the local vLLM was last seen refusing connections.
//!
//! A P/D request sent while the decoder is down would still run its prefill, and the
//! prefiller would pin KV blocks for a decode that cannot happen: vLLM has no call to free
//! them, so they stay until its lease expires. Once a decode leg failed to connect, each P/D
//! request first checks that the decoder accepts connections again, and fails fast otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::info;

/// The decoder's last known state.
pub struct DecoderHealth {
    authority: String,
    connect_timeout: Duration,
    down: AtomicBool,
}

impl DecoderHealth {
    /// Starts as up: the common path costs one atomic load.
    pub fn new(authority: &str, connect_timeout: Duration) -> Self {
        Self {
            authority: authority.to_string(),
            connect_timeout,
            down: AtomicBool::new(false),
        }
    }

    /// Records a failed request: a connect failure means the decoder is down.
    pub fn record(&self, e: &hyper_util::client::legacy::Error) {
        if e.is_connect() {
            self.down.store(true, Ordering::Relaxed);
        }
    }

    /// Ok if the decoder is believed up, or is found to accept connections again.
    pub async fn check(&self) -> Result<(), String> {
        if !self.down.load(Ordering::Relaxed) {
            return Ok(());
        }
        match crate::runtime::within(self.connect_timeout, TcpStream::connect(&self.authority))
            .await
        {
            Ok(Ok(_)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    info!(decoder = %self.authority, "decoder accepts connections again");
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }
}
