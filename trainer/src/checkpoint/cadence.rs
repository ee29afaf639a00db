//! When a training loop saves: every `checkpoint.every_steps` steps, every
//! `checkpoint.every_minutes` minutes since the last save, at the last step, and when a stop
//! is asked for. Every rank must save at the same step, so the clock's verdict is agreed over
//! the ranks ([`crate::parallel::DataParallel::agree`]) before [`SaveCadence::due`] is asked.

use crate::config::CheckpointConfig;
use std::time::{Duration, Instant};

/// A loop's save schedule and the time of its last save.
#[derive(Debug)]
pub struct SaveCadence {
    every_steps: u64,
    every: Option<Duration>,
    last: Instant,
}

impl SaveCadence {
    /// The schedule of `cfg`, its clock started now.
    pub fn new(cfg: &CheckpointConfig) -> Self {
        Self {
            every_steps: cfg.every_steps,
            every: (cfg.every_minutes > 0.0)
                .then(|| Duration::from_secs_f64(cfg.every_minutes * 60.0)),
            last: Instant::now(),
        }
    }

    /// Whether this rank's clock says a save is due.
    pub fn clock_due(&self) -> bool {
        self.every.is_some_and(|every| self.last.elapsed() >= every)
    }

    /// Whether to save after `step`, given whether any rank's clock is due and whether a
    /// stop was asked for.
    pub fn due(&self, step: u64, max_steps: u64, clock_due: bool, stop: bool) -> bool {
        stop || clock_due || step.is_multiple_of(self.every_steps) || step == max_steps
    }

    /// A save was made: the clock starts again.
    pub fn saved(&mut self) {
        self.last = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cadence(every_steps: u64, every_minutes: f64) -> SaveCadence {
        SaveCadence::new(&CheckpointConfig {
            every_steps,
            every_minutes,
            ..Default::default()
        })
    }

    #[test]
    fn steps_last_step_and_stop_are_due_and_the_clock_only_when_set() {
        let c = cadence(5, 0.0);
        assert!(!c.clock_due());
        let due: Vec<u64> = (1..=12).filter(|&s| c.due(s, 12, false, false)).collect();
        assert_eq!(due, [5, 10, 12]);
        assert!(c.due(3, 12, false, true));
        assert!(c.due(3, 12, true, false));
    }

    #[test]
    fn the_clock_is_due_after_its_minutes_and_restarts_at_a_save() {
        let mut c = cadence(1000, 0.0001); // 6 ms
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.clock_due());
        c.saved();
        assert!(!c.clock_due());
    }
}
