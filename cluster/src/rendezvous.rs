//! Where a data-parallel rank sits and where rank 0 listens, from the launcher's environment.
//!
//! Three launchers are understood, in this order:
//! - torch style (our `launch`, torchrun, a Kubernetes pod running `launch`): `RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`;
//! - a Slurm step started by `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`,
//!   `SLURM_STEP_TASKS_PER_NODE`; rank 0's host is `MASTER_ADDR` or else the first host of
//!   `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST`; the port is `MASTER_PORT` or else derived
//!   from `SLURM_JOB_ID`, so two jobs sharing a node do not collide;
//! - a Kubernetes Indexed Job with one rank per pod: `JOB_COMPLETION_INDEX` as the rank with
//!   `WORLD_SIZE` and `MASTER_ADDR` set by the manifest.
//!
//! Nothing set means a single process.

use crate::{env_number, ClusterError};

/// The port rank 0's store listens on when nothing names one (torch's default too).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// One rank's place in a data-parallel job, validated when built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// This process's rank, `0 <= rank < world`.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// Rank on this node (picks the GPU).
    pub local_rank: usize,
    /// Ranks on this node.
    pub local_world: usize,
    /// Host of rank 0, where the rendezvous store listens.
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// Which launcher's variables gave this, for logs and errors.
    pub source: &'static str,
}

impl Rendezvous {
    /// A process alone: rank 0 of 1 on loopback.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            source: "a single process",
        }
    }

    /// Whether other ranks take part.
    pub fn is_distributed(&self) -> bool {
        self.world > 1
    }

    /// Reads the rendezvous from this process's environment.
    pub fn from_env() -> Result<Self, ClusterError> {
        Self::resolve(|k| std::env::var(k).ok())
    }

    /// Reads the rendezvous through `env` (see the module docs for the variables).
    pub fn resolve(env: impl Fn(&str) -> Option<String>) -> Result<Self, ClusterError> {
        // Set but empty reads as unset (for all but MASTER_PORT).
        let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let addr = || set("MASTER_ADDR").map(|v| v.trim().to_string());
        let num = |name: &'static str| env_number::<usize>(&set, name);
        let need = |name: &'static str, source: &'static str| -> Result<usize, ClusterError> {
            num(name)?.ok_or(ClusterError::MissingEnv {
                name,
                launcher: source,
            })
        };
        let port = |fallback: u16| Ok(env_number::<u16>(&env, "MASTER_PORT")?.unwrap_or(fallback));
        // Rank 0's host, required once other ranks take part.
        let master = |world: usize, source: &'static str| -> Result<String, ClusterError> {
            if world <= 1 {
                return Ok("127.0.0.1".into());
            }
            addr().ok_or(ClusterError::MissingEnv {
                name: "MASTER_ADDR",
                launcher: source,
            })
        };

        let rdv = if let Some(rank) = num("RANK")? {
            let source = "RANK/WORLD_SIZE";
            let world = need("WORLD_SIZE", source)?;
            let local_world = num("LOCAL_WORLD_SIZE")?.unwrap_or(1);
            Self {
                rank,
                world,
                local_rank: num("LOCAL_RANK")?.unwrap_or(rank % local_world.max(1)),
                local_world,
                master_addr: master(world, source)?,
                master_port: port(DEFAULT_MASTER_PORT)?,
                source,
            }
        } else if let (Some(rank), Some(world)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            let source = "Slurm (SLURM_PROCID/SLURM_NTASKS)";
            let master_addr = addr().unwrap_or_else(|| {
                env("SLURM_STEP_NODELIST")
                    .or_else(|| env("SLURM_JOB_NODELIST"))
                    .and_then(|l| first_host(&l))
                    .unwrap_or_else(|| "127.0.0.1".into())
            });
            let job_port = match num("SLURM_JOB_ID")? {
                Some(id) => 20_000 + (id % 20_000) as u16,
                None => DEFAULT_MASTER_PORT,
            };
            let local_world = env("SLURM_STEP_TASKS_PER_NODE")
                .or_else(|| env("SLURM_TASKS_PER_NODE"))
                .and_then(|v| leading_number(&v))
                .unwrap_or(1);
            Self {
                rank,
                world,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(0),
                local_world,
                master_addr,
                master_port: port(job_port)?,
                source,
            }
        } else if let Some(rank) =
            num("JOB_COMPLETION_INDEX")?.filter(|_| env("WORLD_SIZE").is_some())
        {
            let source = "Kubernetes (JOB_COMPLETION_INDEX/WORLD_SIZE)";
            let world = need("WORLD_SIZE", source)?;
            Self {
                rank,
                world,
                local_rank: 0,
                local_world: 1,
                master_addr: master(world, source)?,
                master_port: port(DEFAULT_MASTER_PORT)?,
                source,
            }
        } else {
            return Ok(Self::single());
        };
        if rdv.world == 0 || rdv.rank >= rdv.world {
            return Err(ClusterError::InvalidSlot {
                index: rdv.rank,
                count: rdv.world,
            });
        }
        Ok(rdv)
    }
}

/// The first host of a Slurm host list: `gpu[03-05,9],cpu1` → `gpu03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let first = &list[..end];
    let host = match (first.find('['), first.find(']')) {
        (Some(open), Some(close)) if open < close => {
            let inside = &first[open + 1..close];
            let item = inside.split(',').next().unwrap_or("");
            let start = item.split('-').next().unwrap_or("");
            format!("{}{}{}", &first[..open], start, &first[close + 1..])
        }
        _ => first.to_string(),
    };
    (!host.is_empty()).then_some(host)
}

/// `2(x3),1` → 2.
fn leading_number(v: &str) -> Option<usize> {
    let digits: String = v.trim().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_env as env;

    #[test]
    fn nothing_set_is_a_single_process() {
        let r = Rendezvous::resolve(env(&[])).unwrap();
        assert_eq!(r, Rendezvous::single());
        assert!(!r.is_distributed());
    }

    #[test]
    fn torch_style() {
        let r = Rendezvous::resolve(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!((r.rank, r.world, r.local_rank, r.local_world), (3, 4, 1, 2));
        assert_eq!((r.master_addr.as_str(), r.master_port), ("node7", 1234));
        let missing = Rendezvous::resolve(env(&[("RANK", "0"), ("WORLD_SIZE", "2")]));
        let msg = missing.unwrap_err().to_string();
        assert!(msg.contains("MASTER_ADDR"), "{msg}");
        let bad = Rendezvous::resolve(env(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
        ]));
        assert!(matches!(
            bad,
            Err(ClusterError::InvalidSlot { index: 2, count: 2 })
        ));
    }

    #[test]
    fn slurm_step_finds_rank_zero_from_the_node_list() {
        let r = Rendezvous::resolve(env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
            ("SLURM_STEP_NODELIST", "gpu[003-004]"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap();
        assert_eq!((r.rank, r.world, r.local_rank, r.local_world), (5, 8, 1, 4));
        assert_eq!(r.master_addr, "gpu003");
        assert_eq!(r.master_port, 20_000 + (123_456 % 20_000) as u16);
    }

    #[test]
    fn kubernetes_indexed_job() {
        let r = Rendezvous::resolve(env(&[
            ("JOB_COMPLETION_INDEX", "2"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "train-0.train"),
        ]))
        .unwrap();
        assert_eq!((r.rank, r.world), (2, 4));
        assert_eq!(r.master_addr, "train-0.train");
        // A completion index alone belongs to a batch stage's worker slot, not to training.
        let alone = Rendezvous::resolve(env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap();
        assert!(!alone.is_distributed());
    }

    #[test]
    fn host_lists() {
        assert_eq!(first_host("gpu[03-05,9],cpu1").as_deref(), Some("gpu03"));
        assert_eq!(first_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(first_host("localhost").as_deref(), Some("localhost"));
        assert_eq!(first_host("rack[2-3]-n").as_deref(), Some("rack2-n"));
        assert_eq!(first_host(""), None);
    }
}
