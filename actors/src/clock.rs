//! The twins' clock: milliseconds since the Unix epoch, for timestamps and deadlines.

use tokio::time::Instant;

/// Where the fleet reads the time. Deadlines (command and job timeouts, health windows,
/// rate pacing) are compared with it, and the timers that wake for them are tokio's.
#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// The system clock when it was made, moved on by tokio's clock since: under
    /// `tokio::time::pause` it stands still until tokio's time advances, so a test runs
    /// through hours of timeouts and pacing at once, and exactly.
    Tokio { epoch_ms: u64, since: Instant },
}

impl Clock {
    /// A clock that follows tokio's time (see [`Clock::Tokio`]).
    pub fn tokio() -> Self {
        Self::Tokio {
            epoch_ms: twin_store::now_millis(),
            since: Instant::now(),
        }
    }

    pub fn now_millis(&self) -> u64 {
        match self {
            Self::System => twin_store::now_millis(),
            Self::Tokio { epoch_ms, since } => epoch_ms + since.elapsed().as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_tokio_time_only() {
        let clock = Clock::tokio();
        let at = clock.now_millis();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.now_millis(), at);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_millis(), at + 3_600_000);
    }
}
