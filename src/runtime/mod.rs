//! Process-level machinery the request path leans on: busy polling, cheap unique ids, and
//! the allocator settings made before the runtime starts.

pub mod alloc;
pub mod busy_poll;
pub mod ids;
