//! What a listener does when `accept` fails or a connection must be refused: back off
//! instead of spinning, and log at a bounded rate instead of once per event.
//!
//! Out of file descriptors (`EMFILE`), `accept` fails at once, every time: without a
//! pause the loop spins on a core and writes hundreds of log lines a second. The pause
//! doubles from 5 ms to 1 s while the failures go on and resets at the next accepted
//! connection; the log gets the first failure and then one line per [`LOG_EVERY`] with the
//! number left out.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// At most one log line per this long for each kind of event.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Logs an event at most once per [`LOG_EVERY`], counting the ones left out.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// `Some(suppressed since the last line)` when this event should be logged.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The accept loop's failures and refusals for one listener.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    pause: Duration,
    failures: RateLimitedLog,
    refusals: RateLimitedLog,
}

impl AcceptErrors {
    /// For the listener named `listener` in the log (`mqtt`, `http`).
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            pause: FIRST_PAUSE,
            failures: RateLimitedLog::default(),
            refusals: RateLimitedLog::default(),
        }
    }

    /// A connection was accepted: the failures are over.
    pub fn accepted(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// `accept` failed: log (rate-limited), then pause, longer each time.
    pub async fn failed(&mut self, error: &std::io::Error) {
        if let Some(suppressed) = self.failures.admit(Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                %error,
                suppressed,
                pause_ms = self.pause.as_millis() as u64,
                "accept failed; pausing before the next accept (out of file descriptors? see the open-file limit logged at start)"
            );
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
    }

    /// A connection was refused at the connection cap (rate-limited log).
    pub fn refused(&mut self, peer: SocketAddr, limit: usize) {
        if let Some(suppressed) = self.refusals.admit(Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                %peer,
                limit,
                suppressed,
                "connection refused: the listener is at its connection cap"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn logs_once_per_period_and_counts_the_rest() {
        let mut log = RateLimitedLog::default();
        let start = Instant::now();
        assert_eq!(log.admit(start), Some(0));
        for i in 1..100 {
            assert_eq!(log.admit(start + Duration::from_millis(i * 50)), None);
        }
        assert_eq!(log.admit(start + LOG_EVERY), Some(99));
        assert_eq!(log.admit(start + LOG_EVERY), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_up_to_a_second_and_reset_on_success() {
        let mut errors = AcceptErrors::new("test");
        let e = std::io::Error::other("Too many open files");
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let before = Instant::now();
            errors.failed(&e).await;
            pauses.push(before.elapsed().as_millis());
        }
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        errors.accepted();
        let before = Instant::now();
        errors.failed(&e).await;
        assert_eq!(before.elapsed(), FIRST_PAUSE);
    }
}
