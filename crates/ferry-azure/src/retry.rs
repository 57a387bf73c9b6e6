//! The one retry helper: jittered exponential backoff, a permanent/transient split
//! ([`AzureError::is_permanent`]), a total time budget and a cancel token.
//!
//! The SDK's own retry policy is switched off ([`azure_core::http::RetryOptions::none`]) so that
//! this helper is the only place that decides: the SDK's default would give up on a 20 s outage
//! after a few tries and would retry a bad key for a minute.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{AzureError, Result};
use crate::stats::Counters;

/// How long and how often to retry transient errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff (doubled after each failure). Default 200 ms.
    pub initial_backoff: Duration,
    /// Ceiling of one backoff. Default 10 s.
    pub max_backoff: Duration,
    /// Total time budget of one operation, all attempts included. Default 10 min.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// Backoff before attempt `attempt + 1` (attempt counts from 1), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        self.initial_backoff
            .saturating_mul(1u32 << shift)
            .min(self.max_backoff)
    }
}

/// A cancellation flag shared by everything working for one job. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wrap an existing flag (for callers that already have one).
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        CancelToken(flag)
    }

    /// Ask every operation holding this token to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Resolves once the token is cancelled (polls every 50 ms).
    pub async fn cancelled(&self) {
        while !self.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What the retried operation is, for log lines and errors.
#[derive(Debug, Clone, Copy)]
pub struct OpName<'a> {
    /// Operation, e.g. `put_pages`.
    pub op: &'static str,
    /// Blob (or container) it works on.
    pub blob: &'a str,
}

/// Run `attempt` until it succeeds, fails permanently, the time budget runs out or `cancel`
/// fires. `attempt` gets the attempt number (from 1). Every retry logs a `warn!` with op, blob,
/// attempt and error, and counts in `counters.retries`.
pub async fn retry<T, F, Fut>(
    what: OpName<'_>,
    policy: &RetryPolicy,
    cancel: &CancelToken,
    counters: Option<&Counters>,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let started = Instant::now();
    let cancelled = || AzureError::Cancelled {
        op: what.op,
        blob: what.blob.to_string(),
    };
    let mut n: u32 = 0;
    loop {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        n += 1;
        let result = tokio::select! {
            r = attempt(n) => r,
            _ = cancel.cancelled() => return Err(cancelled()),
        };
        let err = match result {
            Ok(v) => return Ok(v),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => e,
        };
        let delay = jitter(policy.backoff(n));
        let elapsed = started.elapsed();
        if elapsed + delay > policy.max_elapsed {
            return Err(AzureError::RetriesExhausted {
                op: what.op,
                blob: what.blob.to_string(),
                attempts: n,
                elapsed,
                last: Box::new(err),
            });
        }
        if let Some(c) = counters {
            c.add_retry();
        }
        tracing::warn!(
            op = what.op,
            blob = what.blob,
            attempt = n,
            backoff_ms = delay.as_millis() as u64,
            error = %err,
            "transient Azure error; retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Err(cancelled()),
        }
    }
}

/// "Equal jitter": half the backoff fixed, half random, so that parallel requests that failed
/// together do not come back together.
fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    let mut b = [0u8; 8];
    // A failing getrandom only loses the jitter, never the retry.
    let r = match getrandom::getrandom(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => u64::from(Instant::now().elapsed().subsec_nanos()),
    };
    let extra_nanos = (half.as_nanos() as u64).checked_mul(r % 1024).unwrap_or(0) / 1024;
    half + Duration::from_nanos(extra_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn transient() -> AzureError {
        AzureError::Transport {
            op: "t",
            blob: "b".into(),
            detail: "reset".into(),
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            max_elapsed: Duration::from_secs(5),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    const WHAT: OpName<'static> = OpName { op: "t", blob: "b" };

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(200));
        assert_eq!(p.backoff(2), Duration::from_millis(400));
        assert_eq!(p.backoff(6), Duration::from_millis(6400));
        assert_eq!(p.backoff(7), Duration::from_secs(10));
        assert_eq!(p.backoff(1000), Duration::from_secs(10));
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(50) && j <= Duration::from_millis(100));
        }
    }

    #[test]
    fn retries_transient_then_succeeds_and_counts() {
        let counters = Counters::default();
        let calls = AtomicU32::new(0);
        let out = rt().block_on(retry(
            WHAT,
            &fast(),
            &CancelToken::new(),
            Some(&counters),
            |n| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 3 {
                        Err(transient())
                    } else {
                        Ok(n)
                    }
                }
            },
        ));
        assert_eq!(out.expect("succeeds"), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(counters.snapshot().retries, 2);
    }

    #[test]
    fn permanent_fails_at_once() {
        let calls = AtomicU32::new(0);
        let out: Result<()> =
            rt().block_on(retry(WHAT, &fast(), &CancelToken::new(), None, |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(AzureError::invalid("t", "b", "nope")) }
            }));
        assert!(matches!(out, Err(AzureError::InvalidArgument { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn gives_up_after_budget() {
        let policy = RetryPolicy {
            max_elapsed: Duration::from_millis(50),
            ..fast()
        };
        let out: Result<()> =
            rt().block_on(retry(WHAT, &policy, &CancelToken::new(), None, |_| async {
                Err(transient())
            }));
        match out {
            Err(AzureError::RetriesExhausted { attempts, last, .. }) => {
                assert!(attempts > 1);
                assert!(matches!(*last, AzureError::Transport { .. }));
            }
            other => panic!("expected RetriesExhausted, got {other:?}"),
        }
    }

    #[test]
    fn cancel_stops_retrying() {
        let cancel = CancelToken::new();
        let c2 = cancel.clone();
        let out: Result<()> = rt().block_on(retry(WHAT, &fast(), &cancel, None, move |n| {
            if n == 2 {
                c2.cancel();
            }
            async { Err(transient()) }
        }));
        assert!(matches!(out, Err(AzureError::Cancelled { .. })));
    }
}
