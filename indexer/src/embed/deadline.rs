//! The time budget of each record's decode (`embed.decode.timeout_ms`).
//!
//! An image decoder cannot be interrupted, so a record is decoded on a helper thread while
//! the decode thread waits for it with a deadline. A record past its deadline is given up on
//! (embed rejects it as `timeout`) and its helper is left behind: the helper finishes that one
//! record, finds nobody waiting for the result, and exits; the next record gets a fresh
//! helper. A decoder that never returns would keep its helper for good, so at most
//! [`Overdue::max`] helpers may be left running in the process; past that, [`Deadline::run`]
//! refuses new work ([`Outcome::Stalled`]) rather than growing threads without bound.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Helpers still running a job that was given up on, across every [`Deadline`] sharing it.
#[derive(Debug)]
pub(crate) struct Overdue {
    running: AtomicUsize,
    max: usize,
}

impl Overdue {
    /// At most `max` given-up jobs may run at once.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            running: AtomicUsize::new(0),
            max,
        })
    }

    /// Given-up jobs still running now.
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// The most given-up jobs that may run at once.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// What became of one job.
#[derive(Debug)]
pub(crate) enum Outcome<T> {
    /// It finished within the budget.
    Done(T),
    /// It ran past the budget; it goes on running on its own and its result is dropped.
    TimedOut,
    /// It panicked, with this message.
    Panicked(String),
    /// It was not started: this many given-up jobs are still running, the most allowed.
    Stalled(usize),
}

/// A job's state, shared by the waiting thread and the helper: whichever moves it off
/// `RUNNING` first decides whether the result is taken or dropped.
const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED: u8 = 2;

type Job<T> = Box<dyn FnOnce() -> T + Send>;

struct Helper<T> {
    jobs: mpsc::Sender<Job<T>>,
    results: mpsc::Receiver<std::thread::Result<T>>,
    state: Arc<AtomicU8>,
}

/// Runs jobs one at a time on a helper thread, each within `budget`.
pub(crate) struct Deadline<T: Send + 'static> {
    budget: Duration,
    overdue: Arc<Overdue>,
    helper: Option<Helper<T>>,
}

impl<T: Send + 'static> Deadline<T> {
    /// Jobs run within `budget`; given-up ones are counted in `overdue`.
    pub(crate) fn new(budget: Duration, overdue: Arc<Overdue>) -> Self {
        Self {
            budget,
            overdue,
            helper: None,
        }
    }

    /// Runs `job` and waits for it at most the budget.
    pub(crate) fn run(&mut self, job: impl FnOnce() -> T + Send + 'static) -> Outcome<T> {
        let running = self.overdue.running();
        if running >= self.overdue.max {
            return Outcome::Stalled(running);
        }
        let helper = match self.helper.take() {
            Some(h) => h,
            None => match self.spawn() {
                Ok(h) => h,
                Err(e) => return Outcome::Panicked(format!("cannot start a decode thread: {e}")),
            },
        };
        helper.state.store(RUNNING, Ordering::SeqCst);
        if helper.jobs.send(Box::new(job)).is_err() {
            return Outcome::Panicked("the decode thread stopped".into());
        }
        match helper.results.recv_timeout(self.budget) {
            Ok(result) => self.finished(helper, result),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Outcome::Panicked("the decode thread stopped".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Counted before the swap, so that a helper which then sees ABANDONED always
                // has a count to give back.
                self.overdue.running.fetch_add(1, Ordering::SeqCst);
                match helper.state.compare_exchange(
                    RUNNING,
                    ABANDONED,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => Outcome::TimedOut, // `helper` dropped: it exits after this job
                    Err(_) => {
                        // It finished between the timeout and the swap: its result is sent.
                        self.overdue.running.fetch_sub(1, Ordering::SeqCst);
                        match helper.results.recv() {
                            Ok(result) => self.finished(helper, result),
                            Err(_) => Outcome::Panicked("the decode thread stopped".into()),
                        }
                    }
                }
            }
        }
    }

    fn finished(&mut self, helper: Helper<T>, result: std::thread::Result<T>) -> Outcome<T> {
        match result {
            Ok(value) => {
                self.helper = Some(helper);
                Outcome::Done(value)
            }
            // A panicking job leaves its helper usable (the panic was caught), but a fresh
            // one costs little and holds no state the panic may have left behind.
            Err(panic) => Outcome::Panicked(panic_message(panic.as_ref())),
        }
    }

    fn spawn(&self) -> std::io::Result<Helper<T>> {
        let (jobs, job_rx) = mpsc::channel::<Job<T>>();
        let (result_tx, results) = mpsc::channel();
        let state = Arc::new(AtomicU8::new(DONE));
        let shared = state.clone();
        let overdue = self.overdue.clone();
        std::thread::Builder::new()
            .name("decode-deadline".into())
            .spawn(move || {
                while let Ok(job) = job_rx.recv() {
                    let result = catch_unwind(AssertUnwindSafe(job));
                    if shared
                        .compare_exchange(RUNNING, DONE, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        // Given up on: nobody takes the result.
                        overdue.running.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                    if result_tx.send(result).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Helper {
            jobs,
            results,
            state,
        })
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Waits until `overdue` has `n` running, for at most 10 s.
    fn wait_for(overdue: &Overdue, n: usize) {
        let start = Instant::now();
        while overdue.running() != n {
            assert!(start.elapsed() < Duration::from_secs(10), "{overdue:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_job_past_its_budget_is_given_up_and_the_next_one_runs() {
        let overdue = Overdue::new(4);
        let mut d = Deadline::new(Duration::from_millis(50), overdue.clone());
        assert!(matches!(d.run(|| 1), Outcome::Done(1)));
        let slow = d.run(|| {
            std::thread::sleep(Duration::from_millis(600));
            2
        });
        assert!(matches!(slow, Outcome::TimedOut), "{slow:?}");
        assert_eq!(overdue.running(), 1);
        // A fresh helper takes the next job while the slow one is still running.
        assert!(matches!(d.run(|| 3), Outcome::Done(3)));
        // The given-up helper gives its count back once its job ends.
        wait_for(&overdue, 0);
        assert!(matches!(d.run(|| 4), Outcome::Done(4)));
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_deadline_goes_on() {
        let mut d = Deadline::new(Duration::from_secs(5), Overdue::new(1));
        match d.run(|| -> u8 { panic!("bad huffman table") }) {
            Outcome::Panicked(msg) => assert!(msg.contains("bad huffman table"), "{msg}"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert!(matches!(d.run(|| 7u8), Outcome::Done(7)));
    }

    #[test]
    fn past_the_most_overdue_jobs_new_work_is_refused_until_one_ends() {
        let overdue = Overdue::new(1);
        let mut d = Deadline::new(Duration::from_millis(20), overdue.clone());
        let (release, wait) = mpsc::channel::<()>();
        let hung = d.run(move || {
            let _ = wait.recv();
        });
        assert!(matches!(hung, Outcome::TimedOut), "{hung:?}");
        assert!(matches!(d.run(|| ()), Outcome::Stalled(1)));
        release.send(()).unwrap();
        wait_for(&overdue, 0);
        assert!(matches!(d.run(|| ()), Outcome::Done(())));
    }
}
