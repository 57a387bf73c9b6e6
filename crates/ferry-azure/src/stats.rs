//! Traffic counters (request bodies sent, responses read, requests, retries) and the pipeline
//! policy that feeds them. The caller reports WAN bytes from [`Stats::bytes_sent`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request};

/// Live counters, shared by every clone of one client.
#[derive(Debug, Default)]
pub struct Counters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Request body bytes sent, retries included (what crossed the WAN); bodies of requests
    /// whose connection was refused are not counted.
    pub bytes_sent: u64,
    /// Blob bytes read by `get_blob` and `get_range`.
    pub bytes_received: u64,
    /// HTTP requests attempted, retries included.
    pub requests: u64,
    /// Retries made by [`crate::retry::retry`] (not counting first attempts).
    pub retries: u64,
}

impl Counters {
    /// Read all counters.
    pub fn snapshot(&self) -> Stats {
        Stats {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_received(&self, n: u64) {
        self.bytes_received.fetch_add(n, Ordering::Relaxed);
    }
}

/// Per-try pipeline policy that counts each request and its body size.
#[derive(Debug)]
pub(crate) struct CountingPolicy {
    pub(crate) counters: Arc<Counters>,
}

#[async_trait::async_trait]
impl Policy for CountingPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let body = request.body().len().unwrap_or(0);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let result = crate::auth::forward(ctx, request, next).await;
        // A refused connection sent nothing; anything else may have put the body on the wire.
        let sent = match &result {
            Ok(_) => true,
            Err(e) => !matches!(e.kind(), azure_core::error::ErrorKind::Connection),
        };
        if sent {
            self.counters.bytes_sent.fetch_add(body, Ordering::Relaxed);
        }
        result
    }
}
