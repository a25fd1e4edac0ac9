//! How a job reaches its fleet: how many targets may have an execution by now (waves or
//! an exponential rate), and when failures stop it. Pure; time passed in.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::DeviceId;

/// A paced job's rollout as it stands: persisted with the job, so that it goes on where it
/// was after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    pub pace: Pace,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortPolicy>,
    /// Every target, in the order they get their executions.
    pub targets: Vec<DeviceId>,
    /// How many of `targets` have an execution.
    pub released: u64,
    /// When the rollout started, moved on by the time it spent paused: a rate counts
    /// running time only, so resuming does not release a burst.
    pub started_at: u64,
    /// Since when the rollout is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<u64>,
    /// When the abort policy stopped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthGate>,
    /// Succeeded targets that met the health gate in time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub healthy: Vec<DeviceId>,
    /// Succeeded targets that did not: they count as failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy: Vec<DeviceId>,
}

/// After `SUCCEEDED`, a device must match `filter` (a fleet filter over its twin, such
/// as `reported.selfTest = "passed"`) within `window_ms`, or it counts as failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthGate {
    pub filter: String,
    pub window_ms: u64,
}

impl Rollout {
    pub fn total(&self) -> u64 {
        self.targets.len() as u64
    }

    /// Pauses (true) or resumes (false) at `now`; doing either twice changes nothing.
    pub fn pause(&mut self, pause: bool, now: u64) {
        match (pause, self.paused_at) {
            (true, None) => self.paused_at = Some(now),
            (false, Some(at)) => {
                self.started_at += now.saturating_sub(at);
                self.paused_at = None;
            }
            _ => {}
        }
    }

    /// Takes `things` out of the targets not released yet (the released ones keep their
    /// place: their executions end `REMOVED`). Returns how many were taken out.
    pub fn withdraw(&mut self, things: &HashSet<DeviceId>) -> usize {
        let released = (self.released as usize).min(self.targets.len());
        let before = self.targets.len();
        let mut index = 0;
        self.targets.retain(|t| {
            index += 1;
            index <= released || !things.contains(t)
        });
        before - self.targets.len()
    }

    /// Marks the targets up to `upto` released, except those `gone` (deleted before their
    /// turn), which leave the targets.
    pub fn release(&mut self, upto: u64, gone: &HashSet<DeviceId>) {
        let from = (self.released as usize).min(self.targets.len());
        let upto = (upto as usize).clamp(from, self.targets.len());
        let before = self.targets.len();
        let mut index = 0;
        self.targets.retain(|t| {
            index += 1;
            index <= from || index > upto || !gone.contains(t)
        });
        self.released = (upto - (before - self.targets.len())) as u64;
    }

    /// Goes on after the server was down: a rate takes up where its releases stood
    /// instead of catching up on the time the server was away (at once, in a burst). The
    /// start moves on so that the running time is the least in which the pace allows what
    /// was released.
    pub fn restart(&mut self, now: u64) {
        if !matches!(self.pace, Pace::Rate { .. }) || self.paused_at.is_some() {
            return;
        }
        let (total, released) = (self.total(), self.released);
        let (mut low, mut high) = (0, self.running_ms(now));
        if self.pace.allowed(total, 0, 0, high) < released {
            return;
        }
        while low < high {
            let mid = low + (high - low) / 2;
            if self.pace.allowed(total, 0, 0, mid) >= released {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        self.started_at = now - high;
    }

    /// How long the rollout has run at `now`, not counting its pauses.
    pub fn running_ms(&self, now: u64) -> u64 {
        self.paused_at
            .unwrap_or(now)
            .saturating_sub(self.started_at)
    }
}

/// The pace of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Pace {
    /// Every target at once.
    All,
    /// Cumulative percentages of the targets, such as 1, 10, 100: a wave starts once every
    /// execution of the waves before it has ended.
    Waves { percents: Vec<u32> },
    /// `base_per_minute` executions in the first minute, `factor` times more each minute
    /// after, never more than `max_per_minute`.
    #[serde(rename_all = "camelCase")]
    Rate {
        base_per_minute: u32,
        factor: f64,
        max_per_minute: u32,
    },
}

/// Stop the rollout once `failure_percent` of at least `min_finished` ended executions
/// failed (FAILED, TIMED_OUT or REJECTED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortPolicy {
    pub failure_percent: u32,
    pub min_finished: u64,
}

impl AbortPolicy {
    pub fn tripped(&self, finished: u64, failed: u64) -> bool {
        finished > 0
            && finished >= self.min_finished
            && failed * 100 >= u64::from(self.failure_percent) * finished
    }
}

impl Pace {
    /// Checks the numbers; the error says which one is wrong.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::All => Ok(()),
            Self::Waves { percents } => {
                let rising = percents.windows(2).all(|w| w[0] < w[1]);
                if percents.is_empty() || !rising || percents.iter().any(|p| !(1..=100).contains(p))
                {
                    return Err("waves are rising percentages from 1 to 100".into());
                }
                Ok(())
            }
            Self::Rate {
                base_per_minute,
                factor,
                max_per_minute,
            } => {
                if *base_per_minute == 0
                    || *factor < 1.0
                    || !factor.is_finite()
                    || max_per_minute < base_per_minute
                {
                    return Err("a rate needs basePerMinute >= 1, factor >= 1 and maxPerMinute >= basePerMinute".into());
                }
                Ok(())
            }
        }
    }

    /// How many of `total` targets may have an execution `elapsed_ms` after the rollout
    /// started, when `finished` of the `released` ones have ended. Never less than
    /// `released`, never more than `total`.
    pub fn allowed(&self, total: u64, released: u64, finished: u64, elapsed_ms: u64) -> u64 {
        let allowed = match self {
            Self::All => total,
            Self::Waves { percents } => {
                let mut allowed = 0;
                for p in percents {
                    allowed = (total * u64::from(*p)).div_ceil(100);
                    if finished < allowed {
                        break;
                    }
                }
                allowed
            }
            Self::Rate {
                base_per_minute,
                factor,
                max_per_minute,
            } => {
                let minutes = elapsed_ms as f64 / 60_000.0;
                let (mut sum, mut rate, mut m) = (0.0, f64::from(*base_per_minute), 0.0);
                while m + 1.0 <= minutes && sum < total as f64 {
                    sum += rate;
                    rate = (rate * factor).min(f64::from(*max_per_minute));
                    m += 1.0;
                }
                sum += rate * (minutes - m);
                // The first execution goes out at once.
                (sum.ceil() as u64).max(1)
            }
        };
        allowed.clamp(released, total.max(released))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_wait_for_the_previous_wave_to_end() {
        let waves = Pace::Waves {
            percents: vec![1, 10, 100],
        };
        assert_eq!(waves.allowed(200, 0, 0, 0), 2);
        assert_eq!(
            waves.allowed(200, 2, 1, 0),
            2,
            "one of the first two still runs"
        );
        assert_eq!(waves.allowed(200, 2, 2, 0), 20);
        assert_eq!(waves.allowed(200, 20, 19, 0), 20);
        assert_eq!(waves.allowed(200, 20, 20, 0), 200);
        assert_eq!(waves.allowed(3, 0, 0, 0), 1, "1% of 3 rounds up");
        assert_eq!(Pace::All.allowed(7, 0, 0, 0), 7);
    }

    #[test]
    fn a_rate_grows_by_its_factor_up_to_its_maximum() {
        let rate = Pace::Rate {
            base_per_minute: 10,
            factor: 2.0,
            max_per_minute: 25,
        };
        assert_eq!(rate.allowed(1000, 0, 0, 0), 1, "one at once");
        assert_eq!(rate.allowed(1000, 0, 0, 30_000), 5);
        assert_eq!(rate.allowed(1000, 0, 0, 60_000), 10);
        assert_eq!(rate.allowed(1000, 0, 0, 120_000), 30);
        assert_eq!(
            rate.allowed(1000, 0, 0, 180_000),
            55,
            "20 then capped at 25"
        );
        assert_eq!(rate.allowed(40, 0, 0, 600_000), 40);
        assert_eq!(
            rate.allowed(1000, 70, 0, 60_000),
            70,
            "never fewer than released"
        );
    }

    fn rollout(pace: Pace) -> Rollout {
        Rollout {
            pace,
            abort: None,
            targets: vec![],
            released: 0,
            started_at: 1_000,
            paused_at: None,
            aborted_at: None,
            health: None,
            healthy: vec![],
            unhealthy: vec![],
        }
    }

    #[test]
    fn paused_time_does_not_count_as_running_time() {
        let mut r = rollout(Pace::All);
        assert_eq!(r.running_ms(61_000), 60_000);
        r.pause(true, 61_000);
        r.pause(true, 90_000);
        assert_eq!(r.running_ms(3_600_000), 60_000, "stands still while paused");
        r.pause(false, 3_661_000);
        r.pause(false, 3_700_000);
        assert_eq!(r.paused_at, None);
        assert_eq!(r.running_ms(3_721_000), 120_000);
    }

    #[test]
    fn only_targets_not_released_yet_are_withdrawn() {
        let ids: Vec<DeviceId> = ["a", "b", "c", "d"]
            .iter()
            .map(|t| DeviceId::parse(t).unwrap())
            .collect();
        let mut r = rollout(Pace::All);
        r.targets = ids.clone();
        r.released = 2;
        let out: HashSet<DeviceId> = [&ids[0], &ids[2]].into_iter().cloned().collect();
        assert_eq!(r.withdraw(&out), 1);
        assert_eq!(r.targets, [ids[0].clone(), ids[1].clone(), ids[3].clone()]);
        assert_eq!(r.withdraw(&out), 0);
    }

    #[test]
    fn targets_gone_before_their_release_leave_the_rollout() {
        let ids: Vec<DeviceId> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|t| DeviceId::parse(t).unwrap())
            .collect();
        let mut r = rollout(Pace::All);
        r.targets = ids.clone();
        r.released = 1;
        // a was released before it was deleted: it keeps its place.
        let gone: HashSet<DeviceId> = [&ids[0], &ids[2], &ids[4]].into_iter().cloned().collect();
        r.release(4, &gone);
        assert_eq!(
            r.targets,
            [&ids[0], &ids[1], &ids[3], &ids[4]].map(Clone::clone)
        );
        assert_eq!(r.released, 3);
        r.release(4, &HashSet::new());
        assert_eq!(r.released, 4);
    }

    #[test]
    fn a_rate_restarted_after_downtime_goes_on_where_it_stood() {
        let mut r = rollout(Pace::Rate {
            base_per_minute: 10,
            factor: 2.0,
            max_per_minute: 40,
        });
        r.targets = (0..200)
            .map(|i| DeviceId::parse(&format!("d{i}")).unwrap())
            .collect();
        r.started_at = 0;
        r.released = 30; // two minutes' worth
        r.restart(3_600_000); // an hour later
        // The least running time in which 30 go out: the 30th is due after 117 s.
        assert_eq!(r.running_ms(3_600_000), 117_001);
        let one_more_minute = r.running_ms(3_660_000);
        assert_eq!(
            r.pace.allowed(200, 30, 0, one_more_minute),
            69,
            "a minute of the third minute's rate, not the hour missed"
        );

        let mut waves = rollout(Pace::Waves {
            percents: vec![100],
        });
        waves.restart(3_600_000);
        assert_eq!(waves.started_at, 1_000, "only a rate counts time");
    }

    #[test]
    fn the_abort_policy_needs_enough_finished_executions() {
        let p = AbortPolicy {
            failure_percent: 20,
            min_finished: 10,
        };
        assert!(!p.tripped(9, 9));
        assert!(!p.tripped(10, 1));
        assert!(p.tripped(10, 2));
        assert!(!p.tripped(0, 0));
    }

    #[test]
    fn bad_paces_say_why() {
        for bad in [
            Pace::Waves { percents: vec![] },
            Pace::Waves {
                percents: vec![10, 5],
            },
            Pace::Waves {
                percents: vec![0, 100],
            },
            Pace::Rate {
                base_per_minute: 0,
                factor: 2.0,
                max_per_minute: 5,
            },
            Pace::Rate {
                base_per_minute: 5,
                factor: 0.5,
                max_per_minute: 5,
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        assert!(Pace::All.check().is_ok());
    }
}
