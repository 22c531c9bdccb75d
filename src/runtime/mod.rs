//! Process-level machinery the request path leans on: busy polling, cheap unique ids, and
//! the allocator settings made before the runtime starts.

pub mod alloc;
pub mod busy_poll;
pub mod ids;

use tokio::task::JoinHandle;

/// A background task that ends with its owner: dropping this aborts the task, where dropping
/// a plain `JoinHandle` detaches it and lets it run on.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
