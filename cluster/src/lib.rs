//! Where a process sits in a job, how the ranks of a job meet, and how jobs are started.
//!
//! - [`WorkerSlot`] (here): a batch stage's worker index and count;
//! - [`rendezvous`]: a rank's place read from the launcher's environment;
//! - [`store`]: the key-value store rank 0 serves so the ranks can find each other;
//! - [`ring`]: the CPU collectives (ring all-reduce, broadcast, barrier over TCP);
//! - [`group`]: the ranks joined into a process group whose collectives work on tensors, over
//!   TCP or NCCL (what data-parallel training synchronises through);
//! - [`job`] and [`launch`]: jobs described and started (local processes, Slurm, Kubernetes).
//!
//! Batch stages (embed, precompute-knn) split their shards over workers. The slot comes from
//! flags when given, otherwise from the launcher's environment: a Slurm array task
//! (`SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`, offset by `SLURM_ARRAY_TASK_MIN`), a
//! Slurm step (`SLURM_PROCID` / `SLURM_NTASKS`), torch-style `RANK` / `WORLD_SIZE`, or a
//! Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, with the count from flags). A process
//! alone is worker 0 of 1.
//!
//! Two ranks of a job meeting through rank 0's store and averaging a tensor, as the
//! launcher's environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) tells them:
//!
//! ```
//! use knn_cluster::group::{join, Backend, GroupOptions};
//! use knn_cluster::launch::free_port;
//! use knn_cluster::rendezvous::Rendezvous;
//! use tch::{Device, Tensor};
//!
//! let port = free_port()?.to_string();
//! let ranks: Vec<_> = (0..2)
//!     .map(|rank| {
//!         let port = port.clone();
//!         std::thread::spawn(move || -> knn_cluster::Result<Vec<f32>> {
//!             let env = |key: &str| match key {
//!                 "RANK" => Some(rank.to_string()),
//!                 "WORLD_SIZE" => Some("2".to_string()),
//!                 "MASTER_ADDR" => Some("127.0.0.1".to_string()),
//!                 "MASTER_PORT" => Some(port.clone()),
//!                 _ => None,
//!             };
//!             let rdv = Rendezvous::resolve(env)?;
//!             let mut group = join(&rdv, Backend::Tcp, Device::Cpu, GroupOptions::default())?;
//!             let grad = Tensor::from_slice(&[rank as f32, 10.0 * rank as f32]);
//!             group.all_reduce_mean(std::slice::from_ref(&grad))?;
//!             Ok(Vec::try_from(&grad).expect("f32 values"))
//!         })
//!     })
//!     .collect();
//! for rank in ranks {
//!     assert_eq!(rank.join().unwrap()?, vec![0.5, 5.0]);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod group;
pub mod job;
pub mod kubernetes;
pub mod launch;
pub mod rendezvous;
pub mod ring;
pub mod store;

pub use error::{ClusterError, Result};

use std::fmt;

/// The number in environment variable `name` read through `env` (`None` when unset).
pub(crate) fn env_number<T: std::str::FromStr>(
    env: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<T>> {
    match env(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ClusterError::BadEnv { name, value: v }),
    }
}

/// An environment of `pairs`, for tests of what reads the environment.
#[cfg(test)]
pub(crate) fn test_env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

/// This worker's index among `count` workers; always valid once built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerSlot {
    index: usize,
    count: usize,
}

impl fmt::Display for WorkerSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {} of {}", self.index, self.count)
    }
}

impl WorkerSlot {
    /// Validates `index < count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(ClusterError::InvalidSlot { index, count });
        }
        Ok(Self { index, count })
    }

    /// The single worker of a one-process run.
    pub fn single() -> Self {
        Self { index: 0, count: 1 }
    }

    /// Zero-based index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Number of workers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Resolves the slot from flags first, then the environment read through `env`.
    pub fn resolve(
        index: Option<usize>,
        count: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let num = |name: &'static str| env_number::<usize>(&env, name);
        let from_env: Option<(usize, Option<usize>, &'static str)> =
            if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
                let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let idx = id.checked_sub(min).ok_or(ClusterError::InvalidSlot {
                    index: id,
                    count: 0,
                })?;
                Some((idx, num("SLURM_ARRAY_TASK_COUNT")?, "SLURM_ARRAY_TASK_ID"))
            } else if let Some(id) = num("SLURM_PROCID")? {
                Some((id, num("SLURM_NTASKS")?, "SLURM_PROCID"))
            } else if let Some(id) = num("RANK")? {
                Some((id, num("WORLD_SIZE")?, "RANK"))
            } else {
                num("JOB_COMPLETION_INDEX")?.map(|id| (id, None, "JOB_COMPLETION_INDEX"))
            };
        match (index, count, from_env) {
            (Some(i), Some(c), _) => Self::new(i, c),
            (Some(i), None, Some((_, Some(c), _))) => Self::new(i, c),
            (Some(i), None, _) => Self::new(i, 1),
            (None, c, Some((i, env_c, name))) => match c.or(env_c) {
                Some(c) => Self::new(i, c),
                None => Err(ClusterError::MissingCount { name }),
            },
            (None, Some(c), None) => Self::new(0, c),
            (None, None, None) => Ok(Self::single()),
        }
    }

    /// Resolves the slot from flags and this process's environment.
    pub fn from_flags_or_env(index: Option<usize>, count: Option<usize>) -> Result<Self> {
        Self::resolve(index, count, |k| std::env::var(k).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_env as env;

    #[test]
    fn flags_win() {
        let s = WorkerSlot::resolve(Some(3), Some(64), env(&[("RANK", "1")])).unwrap();
        assert_eq!((s.index(), s.count()), (3, 64));
    }

    #[test]
    fn slurm_array_is_offset_by_its_minimum() {
        let e = env(&[
            ("SLURM_ARRAY_TASK_ID", "12"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            WorkerSlot::resolve(None, None, e).unwrap(),
            WorkerSlot::new(2, 4).unwrap()
        );
    }

    #[test]
    fn torch_style_and_kubernetes() {
        let s = WorkerSlot::resolve(None, None, env(&[("RANK", "1"), ("WORLD_SIZE", "2")]));
        assert_eq!(s.unwrap(), WorkerSlot::new(1, 2).unwrap());
        let k = WorkerSlot::resolve(None, None, env(&[("JOB_COMPLETION_INDEX", "5")]));
        assert!(matches!(
            k.unwrap_err(),
            ClusterError::MissingCount {
                name: "JOB_COMPLETION_INDEX"
            }
        ));
        let k = WorkerSlot::resolve(None, Some(8), env(&[("JOB_COMPLETION_INDEX", "5")]));
        assert_eq!(k.unwrap(), WorkerSlot::new(5, 8).unwrap());
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            WorkerSlot::new(4, 4),
            Err(ClusterError::InvalidSlot { index: 4, count: 4 })
        ));
        let bad = WorkerSlot::resolve(None, None, env(&[("RANK", "x")])).unwrap_err();
        assert!(matches!(bad, ClusterError::BadEnv { name: "RANK", .. }));
        assert_eq!(
            WorkerSlot::resolve(None, None, env(&[])).unwrap(),
            WorkerSlot::single()
        );
    }
}
