//! Per-device rate limits, as AWS IoT documents them: publishes per second on one
//! connection, and connects per second per client id (a device stuck in a reconnect loop
//! must not cost a twin activation and a durable write each time).

use std::sync::Mutex;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::accept::RateLimitedLog;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; a `rate` of 0 admits everything.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token if there is one.
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again (forgetting it changes nothing).
    fn full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Client ids remembered at most before the full buckets are forgotten at once.
const SWEEP_ABOVE: usize = 100_000;

/// Connect attempts per client id, across the endpoint.
pub(crate) struct ConnectLimits {
    rate: u32,
    burst: u32,
    buckets: DashMap<String, TokenBucket>,
    log: Mutex<RateLimitedLog>,
}

impl ConnectLimits {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            burst,
            buckets: DashMap::new(),
            log: Mutex::default(),
        }
    }

    /// Whether `client_id` may try to connect now (logged, at a bounded rate, when not).
    pub(crate) fn admit(&self, client_id: &str) -> bool {
        if self.rate == 0 {
            return true;
        }
        let now = Instant::now();
        if self.buckets.len() > SWEEP_ABOVE {
            self.sweep();
        }
        let admitted = self
            .buckets
            .entry(client_id.to_owned())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            .admit(now);
        if !admitted {
            let log = self
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(now);
            if let Some(suppressed) = log {
                tracing::warn!(
                    %client_id,
                    limit = self.rate,
                    suppressed,
                    "connect refused: too many connects for this client id (mqtt_max_connects_per_second)"
                );
            }
        }
        admitted
    }

    /// Forgets the client ids whose buckets are full again.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.buckets.retain(|_, b| !b.full(now));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_admits_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10, 5, start);
        assert_eq!((0..8).filter(|_| b.admit(start)).count(), 5);
        assert!(!b.admit(start + Duration::from_millis(50)));
        assert!(
            b.admit(start + Duration::from_millis(100)),
            "one token in 100 ms at 10/s"
        );
        assert!(!b.admit(start + Duration::from_millis(150)));
        let later = start + Duration::from_secs(60);
        assert_eq!(
            (0..8).filter(|_| b.admit(later)).count(),
            5,
            "no more than the burst saved up"
        );
        let mut unlimited = TokenBucket::new(0, 1, start);
        assert!((0..1000).all(|_| unlimited.admit(start)));
    }

    #[tokio::test(start_paused = true)]
    async fn connects_are_limited_per_client_id_and_forgotten_when_refilled() {
        let limits = ConnectLimits::new(1, 2);
        assert!(limits.admit("a") && limits.admit("a"));
        assert!(!limits.admit("a"), "the third connect within a second");
        assert!(limits.admit("b"), "another client id has its own budget");
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(limits.admit("a"));
        tokio::time::advance(Duration::from_secs(2)).await;
        limits.sweep();
        assert!(limits.buckets.is_empty(), "full buckets are forgotten");
        assert!(ConnectLimits::new(0, 1).admit("a"));
    }
}
