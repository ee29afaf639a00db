//! Evaluation of trained models (`knn-diffusion eval`): does kNN conditioning do what the
//! paper claims, at small scale and in one command?
//!
//! - [`metrics`]: the measures, pure functions on embedding tensors (a judge CLIP's image
//!   and text space), each checked against a Python reference;
//! - [`config`]: `[eval]` and its `--quick` form;
//! - [`arms`]: the trained arms per seed (kNN at k = 20 with neighbour-count dropout, and
//!   k = 0), trained under one budget (on the CPU in child processes, a share of the cores
//!   each) or taken from checkpoints, cached;
//! - [`sets`]: the held-out rows with captions and images, and each style's images;
//! - [`measure`]: one set of samples read against the held-out set in the judge's space;
//! - [`report`]: per seed, over seeds, the claims' verdicts, `report.md` / `report.json`;
//! - [`run`]: the orchestration that wires them together.

pub mod arms;
pub mod config;
pub mod measure;
pub mod metrics;
pub mod report;
pub mod run;
pub mod sets;

pub use arms::{parse_arm, ArmLauncher};
pub use config::EvalConfig;
pub use run::{eval, train_arm, EvalPlan, EvalSummary};
