//! Optional busy polling (`-busy-poll=DURATION`), for the lowest latency at low load.
//!
//! Between the hops of a P/D request (client, prefiller, decoder) an idle sidecar sleeps in
//! `epoll_wait`, and each reply must then wake its thread: on a VM that is an inter-processor
//! interrupt and a reschedule, tens of microseconds per hop. With busy polling, every request
//! received and every leg sent keeps the runtime polling for events, without sleeping, for the
//! given window. A task yields in a loop; tokio's current-thread scheduler runs a yielded task
//! again only after polling the I/O driver without blocking, and only when no other task is
//! ready, so the spin never delays real work. It costs CPU (up to one core while a window is
//! open) and helps only when replies come within the window: off by default. With more than
//! one worker thread only one of them spins.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A handle that opens polling windows; cheap to clone, a no-op when disabled.
#[derive(Clone, Default)]
pub struct BusyPoll {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    window: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch` until which to poll.
    until: AtomicU64,
    wake: Notify,
}

impl BusyPoll {
    /// Starts the polling task on the current runtime; a zero window disables busy polling.
    pub fn start(window: Duration) -> Self {
        if window.is_zero() {
            return Self::default();
        }
        let inner = Arc::new(Inner {
            window,
            epoch: Instant::now(),
            until: AtomicU64::new(0),
            wake: Notify::new(),
        });
        // Process-long poller: it sleeps on `wake` while no window is open.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(spin(Arc::clone(&inner)));
        Self { inner: Some(inner) }
    }

    /// Keeps polling for at least the window from now: a reply or a request is expected.
    pub fn touch(&self) {
        if let Some(inner) = &self.inner {
            let now = inner.epoch.elapsed();
            if inner
                .until
                .fetch_max(nanos(now + inner.window), Ordering::Relaxed)
                < nanos(now)
            {
                // The spinner may be asleep; a stored permit covers the race with it.
                inner.wake.notify_one();
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

async fn spin(inner: Arc<Inner>) {
    loop {
        while nanos(inner.epoch.elapsed()) < inner.until.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
        inner.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off (the default), busy polling costs nothing: no poller task, and touching it does
    /// not start one. The enabled case shows the count can move.
    #[tokio::test]
    async fn disabled_starts_no_poller() {
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = tasks();
        let off = BusyPoll::start(Duration::ZERO);
        off.touch();
        assert_eq!(tasks(), before, "a disabled busy poll spawned a task");
        let _on = BusyPoll::start(Duration::from_micros(50));
        assert_eq!(tasks(), before + 1, "an enabled busy poll runs one poller");
    }

    /// The spinner must not starve the tasks it polls for: sockets and timers still work
    /// while a window is open.
    #[tokio::test]
    async fn io_makes_progress_while_spinning() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let busy = BusyPoll::start(Duration::from_secs(30));
        busy.touch();
        let exchange = async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (client, server) =
                tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
            let (mut client, (mut server, _)) = (client.unwrap(), server.unwrap());
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            buf
        };
        let buf = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("I/O and timers run while the spinner is active");
        assert_eq!(&buf, b"ping");
        let inner = busy.inner.as_ref().unwrap();
        assert!(inner.until.load(Ordering::Relaxed) > nanos(inner.epoch.elapsed()));
    }
}
