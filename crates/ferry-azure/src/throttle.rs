//! Upload bandwidth limit: a pure token bucket ([`TokenBucket`], modelled on Firecracker's
//! `rate_limiter`: size, refill time, one-time burst; it never blocks and never reads a clock)
//! and [`Throttle`], the shared, live-adjustable wrapper every upload waits on.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::retry::CancelToken;

/// A token bucket over bytes. Time is passed in (`now`), so it is deterministic to test.
///
/// `size` tokens refill in `refill_time`; `one_time_burst` extra tokens are available once at
/// the start and are used before the regular budget. A request larger than `size` is allowed
/// when the bucket is full and leaves the bucket in debt, so the average rate still holds.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_time: Duration,
    one_time_burst: u64,
    /// Current tokens; negative while paying back a request larger than `size`.
    budget: i128,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket. `None` when `size` or `refill_time` is zero (that means "no limit").
    pub fn new(
        size: u64,
        one_time_burst: u64,
        refill_time: Duration,
        now: Instant,
    ) -> Option<Self> {
        if size == 0 || refill_time.is_zero() {
            return None;
        }
        Some(TokenBucket {
            size,
            refill_time,
            one_time_burst,
            budget: i128::from(size),
            last_update: now,
        })
    }

    /// Capacity of the regular budget.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tokens available now (regular budget, may be negative) and the one-time burst left.
    pub fn available(&mut self, now: Instant) -> (i128, u64) {
        self.refill(now);
        (self.budget, self.one_time_burst)
    }

    /// Take `n` tokens now, or say how long until they can be taken. Never blocks; on `Err`
    /// nothing is consumed.
    pub fn try_consume(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        if n == 0 {
            return Ok(());
        }
        self.refill(now);
        let from_burst = n.min(self.one_time_burst);
        let need = n - from_burst;
        if need == 0 {
            self.one_time_burst -= from_burst;
            return Ok(());
        }
        let threshold = i128::from(need.min(self.size));
        if self.budget >= threshold {
            self.one_time_burst -= from_burst;
            self.budget -= i128::from(need);
            return Ok(());
        }
        let deficit = (threshold - self.budget) as u128;
        let refill_ns = self.refill_time.as_nanos();
        let size = u128::from(self.size);
        let wait_ns = (deficit * refill_ns).div_ceil(size);
        let accrued_ns = now.saturating_duration_since(self.last_update).as_nanos();
        let wait = wait_ns.saturating_sub(accrued_ns).max(1);
        Err(Duration::from_nanos(
            u64::try_from(wait).unwrap_or(u64::MAX),
        ))
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        let refill_ns = self.refill_time.as_nanos();
        let size = u128::from(self.size);
        let new_tokens = elapsed * size / refill_ns;
        if new_tokens == 0 {
            return;
        }
        let budget = self
            .budget
            .saturating_add(new_tokens.min(i128::MAX as u128) as i128);
        if budget >= i128::from(self.size) {
            self.budget = i128::from(self.size);
            self.last_update = now;
        } else {
            self.budget = budget;
            // Advance only by the time those whole tokens took, keeping the fraction.
            let used_ns = new_tokens * refill_ns / size;
            self.last_update += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        }
    }
}

/// A byte rate: `bytes_per_sec` sustained, one second's worth of bucket, plus a one-time burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained rate in bytes per second.
    pub bytes_per_sec: u64,
    /// Extra bytes allowed once, at the start, above the sustained rate.
    pub one_time_burst: u64,
}

/// The shared upload throttle. Unlimited until [`Throttle::set_rate`] says otherwise; the rate
/// can change while uploads run (the next `consume` sees it).
#[derive(Debug, Default)]
pub struct Throttle {
    bucket: Mutex<Option<TokenBucket>>,
}

impl Throttle {
    /// A throttle with the given rate (`None` = unlimited).
    pub fn new(rate: Option<RateLimit>) -> Self {
        let t = Throttle::default();
        t.set_rate(rate);
        t
    }

    /// Change the rate; `None` or a zero rate removes the limit.
    pub fn set_rate(&self, rate: Option<RateLimit>) {
        let bucket = rate.and_then(|r| {
            TokenBucket::new(
                r.bytes_per_sec,
                r.one_time_burst,
                Duration::from_secs(1),
                Instant::now(),
            )
        });
        *self.lock() = bucket;
    }

    /// The current sustained rate in bytes per second, `None` if unlimited.
    pub fn rate(&self) -> Option<u64> {
        self.lock().as_ref().map(TokenBucket::size)
    }

    /// Non-blocking: take `n` bytes or learn how long to wait.
    pub fn try_consume(&self, n: u64) -> Result<(), Duration> {
        match self.lock().as_mut() {
            Some(b) => b.try_consume(n, Instant::now()),
            None => Ok(()),
        }
    }

    /// Wait (async) until `n` bytes may be sent. Returns `false` if cancelled first.
    pub async fn consume(&self, n: u64, cancel: &CancelToken) -> bool {
        loop {
            if cancel.is_cancelled() {
                return false;
            }
            match self.try_consume(n) {
                Ok(()) => return true,
                // Re-check at least every 100 ms: the rate may change or a cancel may come.
                Err(wait) => tokio::time::sleep(wait.min(Duration::from_millis(100))).await,
            }
        }
    }

    /// Wait (blocking the thread) until `n` bytes may be sent. Returns `false` if cancelled.
    pub fn consume_blocking(&self, n: u64, cancel: &CancelToken) -> bool {
        loop {
            if cancel.is_cancelled() {
                return false;
            }
            match self.try_consume(n) {
                Ok(()) => return true,
                Err(wait) => std::thread::sleep(wait.min(Duration::from_millis(100))),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<TokenBucket>> {
        // A panic while holding this lock cannot leave the bucket inconsistent enough to matter.
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn zero_means_unlimited() {
        let t0 = Instant::now();
        assert!(TokenBucket::new(0, 0, Duration::from_secs(1), t0).is_none());
        assert!(TokenBucket::new(10, 0, Duration::ZERO, t0).is_none());
        let t = Throttle::new(None);
        assert_eq!(t.try_consume(u64::MAX), Ok(()));
        assert_eq!(t.rate(), None);
    }

    #[test]
    fn drains_then_refills_at_rate() {
        let t0 = Instant::now();
        // 1000 tokens per second.
        let mut b = TokenBucket::new(1000, 0, Duration::from_secs(1), t0).expect("bucket");
        assert_eq!(b.try_consume(600, t0), Ok(()));
        assert_eq!(b.try_consume(400, t0), Ok(()));
        // Empty: 100 tokens take 100 ms.
        assert_eq!(b.try_consume(100, t0), Err(100 * MS));
        // Nothing was consumed by the refusal; 50 ms later half has accrued.
        assert_eq!(b.try_consume(100, t0 + 50 * MS), Err(50 * MS));
        assert_eq!(b.try_consume(100, t0 + 100 * MS), Ok(()));
        // Refill never exceeds size.
        assert_eq!(b.available(t0 + Duration::from_secs(100)), (1000, 0));
    }

    #[test]
    fn fractional_refill_is_not_lost() {
        let t0 = Instant::now();
        // 3 tokens per second: one every 333.33 ms.
        let mut b = TokenBucket::new(3, 0, Duration::from_secs(1), t0).expect("bucket");
        assert_eq!(b.try_consume(3, t0), Ok(()));
        let mut now = t0;
        let mut got = 0;
        for _ in 0..30 {
            now += 100 * MS;
            if b.try_consume(1, now).is_ok() {
                got += 1;
            }
        }
        // 3 s elapsed at 3/s: 9 tokens, no drift from rounding.
        assert_eq!(got, 9);
    }

    #[test]
    fn one_time_burst_used_first_and_once() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 1000, Duration::from_secs(1), t0).expect("bucket");
        assert_eq!(b.try_consume(1000, t0), Ok(()));
        assert_eq!(b.available(t0), (100, 0));
        assert_eq!(b.try_consume(100, t0), Ok(()));
        assert!(b.try_consume(1, t0).is_err());
        // After a long idle only `size` comes back, not the burst.
        assert_eq!(b.available(t0 + Duration::from_secs(60)), (100, 0));
    }

    #[test]
    fn partial_burst_not_consumed_on_refusal() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 50, Duration::from_secs(1), t0).expect("bucket");
        assert_eq!(b.try_consume(100, t0), Ok(())); // 50 burst + 50 budget
        assert_eq!(b.available(t0), (50, 0));
        let mut b = TokenBucket::new(100, 50, Duration::from_secs(1), t0).expect("bucket");
        assert_eq!(b.try_consume(100, t0), Ok(()));
        assert_eq!(b.try_consume(60, t0), Err(100 * MS)); // needs 60, has 50
        assert_eq!(b.available(t0), (50, 0));
    }

    #[test]
    fn oversized_request_goes_into_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 0, Duration::from_secs(1), t0).expect("bucket");
        // 4000 > size: allowed from a full bucket, then 3 s of debt plus the next request.
        assert_eq!(b.try_consume(4000, t0), Ok(()));
        assert_eq!(b.available(t0), (-3000, 0));
        assert_eq!(b.try_consume(1000, t0), Err(Duration::from_secs(4)));
        assert_eq!(b.try_consume(1000, t0 + Duration::from_secs(4)), Ok(()));
    }

    #[test]
    fn throttle_rate_changes_live() {
        let t = Throttle::new(Some(RateLimit {
            bytes_per_sec: 10,
            one_time_burst: 0,
        }));
        assert_eq!(t.rate(), Some(10));
        assert_eq!(t.try_consume(10), Ok(()));
        assert!(t.try_consume(10).is_err());
        t.set_rate(None);
        assert_eq!(t.try_consume(1 << 40), Ok(()));
    }

    #[test]
    fn consume_blocking_waits_about_right() {
        let t = Throttle::new(Some(RateLimit {
            bytes_per_sec: 1000,
            one_time_burst: 0,
        }));
        let cancel = CancelToken::new();
        assert!(t.consume_blocking(1000, &cancel));
        let start = Instant::now();
        assert!(t.consume_blocking(200, &cancel));
        let waited = start.elapsed();
        assert!(
            waited >= 150 * MS && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        cancel.cancel();
        assert!(!t.consume_blocking(1_000_000, &cancel));
    }
}
