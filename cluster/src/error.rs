//! The one error type of the cluster crate: what can go wrong placing a worker, meeting the
//! other ranks, running a collective, or describing and starting a job. Each variant carries
//! the rank, address, key or program involved and says what to do about it.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors of the cluster crate.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Index not below count, or count zero.
    #[error("worker {index} of {count} is not valid: need 0 <= worker < workers and workers >= 1")]
    InvalidSlot { index: usize, count: usize },
    /// An environment variable holds no number.
    #[error("environment variable {name}={value:?} is not a non-negative integer")]
    BadEnv { name: &'static str, value: String },
    /// A launcher's variables are only partly set.
    #[error("{launcher} is set but {name} is not: set {name} (or launch with `knn-diffusion launch`, `srun` or a rendered job)")]
    MissingEnv {
        name: &'static str,
        launcher: &'static str,
    },
    /// An index came from the environment but no count did.
    #[error("{name} gives this worker's index but nothing gives the worker count; pass --workers")]
    MissingCount { name: &'static str },

    /// The rendezvous store's server could not listen.
    #[error("cannot serve the rendezvous store on {addr}: {source}")]
    StoreListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The rendezvous store did not answer (not started, gone, or the network is down).
    #[error("rendezvous store at {addr} (rank 0) {what}: {source}; is rank 0 running and MASTER_ADDR/MASTER_PORT right?")]
    StoreUnreachable {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A rendezvous key was not set by any rank in time.
    #[error("rendezvous key `{key}` was not set within {timeout_s} s: a rank did not start or stopped early")]
    KeyTimeout { key: String, timeout_s: f64 },

    /// A peer did not answer in time or its connection broke.
    #[error(
        "rank {rank} ({addr}) {what}: {source}; is that process alive? (timeout {timeout_s} s)"
    )]
    Peer {
        rank: usize,
        addr: SocketAddr,
        what: &'static str,
        timeout_s: f64,
        #[source]
        source: std::io::Error,
    },
    /// This rank could not listen on its address.
    #[error("rank {rank} cannot listen on {addr}: {source}")]
    Listen {
        rank: usize,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Ranks disagree on a buffer's length.
    #[error("rank {rank} sent {got} values where {want} were expected: the ranks disagree on the buffer")]
    Mismatch {
        rank: usize,
        got: usize,
        want: usize,
    },
    /// Rank 0's host name does not resolve.
    #[error("MASTER_ADDR {host:?} does not resolve: {reason}")]
    Resolve { host: String, reason: String },
    /// Two ranks were started with different world sizes.
    #[error("rank {rank} was started with world size {theirs:?} but this rank with {ours}: start every rank from the same job")]
    WorldMismatch {
        rank: usize,
        theirs: String,
        ours: usize,
    },
    /// NCCL or CUDA refused.
    #[error("NCCL {what}: {reason}")]
    Nccl { what: &'static str, reason: String },
    /// A GPU collective did not finish in time.
    #[error("NCCL {op} over {world} ranks did not finish within {timeout_s} s: a rank is lost or frozen (the communicator was aborted)")]
    Timeout {
        op: &'static str,
        world: usize,
        timeout_s: f64,
    },
    /// The ring layout is impossible.
    #[error("rank {rank} of {world} with {addrs} addresses is not a valid ring")]
    Layout {
        rank: usize,
        world: usize,
        addrs: usize,
    },

    /// A job file's value is out of range or inconsistent.
    #[error("job `{file}`, `{key}`: {reason}")]
    InvalidJob {
        file: String,
        key: &'static str,
        reason: String,
    },
    /// A program could not be started.
    #[error("cannot run `{program}`: {source}{hint}")]
    Spawn {
        program: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A submission tool refused the job.
    #[error("`{program}` failed ({status}): {stderr}")]
    Refused {
        program: String,
        status: String,
        stderr: String,
    },
    /// Local processes failed.
    #[error("{failed} of {total} processes failed: {detail}")]
    Failed {
        failed: usize,
        total: usize,
        detail: String,
        /// Every process's exit code, in rank order (`None`: killed by a signal).
        codes: Vec<Option<i32>>,
    },
    /// The job's layout cannot run on this machine.
    #[error("{0}")]
    Unrunnable(String),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`ClusterError`].
pub type Result<T> = std::result::Result<T, ClusterError>;
