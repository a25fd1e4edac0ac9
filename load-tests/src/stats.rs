//! Measurements: an HDR histogram of latencies overall and per second of the run, and
//! live counters for the progress bar.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Second {
    pub second: u64,
    pub ok: u64,
    pub errors: u64,
    /// `None` in a second without a completed operation.
    pub latency_us: Option<Percentiles>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

struct Inner {
    total: Histogram<u64>,
    seconds: Vec<(Histogram<u64>, u64, u64)>,
}

/// Shared by every simulated device of a run.
pub struct Recorder {
    start: Instant,
    inner: Mutex<Inner>,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            inner: Mutex::new(Inner {
                total: histogram(),
                seconds: Vec::new(),
            }),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    fn slot(inner: &mut Inner, second: usize) -> &mut (Histogram<u64>, u64, u64) {
        while inner.seconds.len() <= second {
            inner.seconds.push((histogram(), 0, 0));
        }
        &mut inner.seconds[second]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A completed operation that took `latency`, finishing at `at`.
    pub fn success(&self, at: Instant, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let second = at.saturating_duration_since(self.start).as_secs() as usize;
        let mut inner = self.lock();
        inner.total.saturating_record(us);
        let slot = Self::slot(&mut inner, second);
        slot.0.saturating_record(us);
        slot.1 += 1;
        drop(inner);
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failure(&self, at: Instant) {
        let second = at.saturating_duration_since(self.start).as_secs() as usize;
        Self::slot(&mut self.lock(), second).2 += 1;
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn latency(&self) -> Option<Percentiles> {
        let inner = self.lock();
        (!inner.total.is_empty()).then(|| Percentiles::of(&inner.total))
    }

    pub fn timeline(&self) -> Vec<Second> {
        self.lock()
            .seconds
            .iter()
            .enumerate()
            .map(|(i, (h, ok, errors))| Second {
                second: i as u64,
                ok: *ok,
                errors: *errors,
                latency_us: (!h.is_empty()).then(|| Percentiles::of(h)),
            })
            .collect()
    }
}

/// Paces one simulated device: `total_rate` operations per second spread over `devices`,
/// or flat out when the rate is 0. Deadlines advance by a fixed period, so a slow
/// operation is caught up rather than drifting the rate down.
pub struct Pacer {
    period: Option<Duration>,
    next: Instant,
}

impl Pacer {
    pub fn new(total_rate: f64, devices: usize, start: Instant, offset: usize) -> Self {
        let period =
            (total_rate > 0.0).then(|| Duration::from_secs_f64(devices.max(1) as f64 / total_rate));
        // Devices start evenly spread over one period, not all at once.
        let first = period.map_or(start, |p| {
            start + p.mul_f64(offset as f64 / devices.max(1) as f64)
        });
        Self {
            period,
            next: first,
        }
    }

    /// When the next operation is due (now, when flat out).
    pub fn next_due(&mut self, now: Instant) -> Instant {
        match self.period {
            None => now,
            Some(p) => {
                let due = self.next;
                self.next += p;
                due
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bookkeeping_adds_up() {
        let start = Instant::now();
        let r = Recorder::new(start);
        for i in 1..=100u64 {
            r.success(
                start + Duration::from_millis(10 * i),
                Duration::from_micros(i * 10),
            );
        }
        r.failure(start + Duration::from_millis(1500));
        let lat = r.latency().unwrap();
        assert_eq!(lat.count, 100);
        assert_eq!(lat.max, 1000);
        assert!((495..=505).contains(&lat.p50), "{lat:?}");
        assert!((985..=995).contains(&lat.p99), "{lat:?}");
        let t = r.timeline();
        assert_eq!(t.iter().map(|s| s.ok).sum::<u64>(), 100);
        assert_eq!(t.iter().map(|s| s.errors).sum::<u64>(), 1);
        assert_eq!(t[0].ok, 99, "10 ms .. 990 ms fall in second 0");
        assert_eq!(t[1].ok, 1);
        assert_eq!(r.ok.load(Ordering::Relaxed), 100);
        assert_eq!(Recorder::default().latency(), None);
    }

    #[test]
    fn pacing_spreads_devices_and_keeps_the_rate() {
        let start = Instant::now();
        // 1000 ops/s over 10 devices: each device every 10 ms, offsets 0, 1, 2 ... ms.
        let mut p = Pacer::new(1000.0, 10, start, 3);
        assert_eq!(p.next_due(start), start + Duration::from_millis(3));
        assert_eq!(p.next_due(start), start + Duration::from_millis(13));
        assert_eq!(
            p.next_due(start + Duration::from_secs(5)),
            start + Duration::from_millis(23),
            "no drift after a stall"
        );
        let mut flat = Pacer::new(0.0, 10, start, 3);
        let now = start + Duration::from_secs(1);
        assert_eq!(flat.next_due(now), now);
    }
}
