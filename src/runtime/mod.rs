//! Process-level machinery the request path leans on: busy polling, cheap unique ids, and
//! the allocator settings made before the runtime starts.

pub mod alloc;
pub mod busy_poll;
pub mod ids;

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::error::Elapsed;

/// A timeout flag's value as a limit: 0 means none (for every timeout flag alike).
pub fn limit(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// `f` under the timeout `d`, where a zero `d` means no limit.
pub async fn within<F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    match limit(d) {
        Some(d) => tokio::time::timeout(d, f).await,
        None => Ok(f.await),
    }
}

/// A background task that ends with its owner: dropping this aborts the task, where dropping
/// a plain `JoinHandle` detaches it and lets it run on.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
