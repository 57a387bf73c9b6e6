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
    /// Request body bytes handed to the transport, retries included (what crossed the WAN).
    pub bytes_sent: u64,
    /// Blob bytes read by `get_blob` and `get_range`.
    pub bytes_received: u64,
    /// HTTP requests sent, retries included.
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

    fn add_request(&self, body: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(body, Ordering::Relaxed);
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
        self.counters.add_request(request.body().len().unwrap_or(0));
        match next.split_first() {
            Some((first, rest)) => first.send(ctx, request, rest).await,
            None => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Other,
                "CountingPolicy must not be the last policy in the pipeline",
            )),
        }
    }
}
