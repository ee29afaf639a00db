//! The metrics log of a training loop: one JSON line every `log_every` steps in
//! `<output_dir>/metrics.jsonl`, written by rank 0 only.
//!
//! Each line holds the step, its loss, the window's mean loss, seconds per step, data wait
//! per step and images per second over the window since the previous line, plus what the
//! loop adds (learning rate, gradient norm, counts). On resume the file is cut back to the
//! resumed step first, so it never holds a step twice.
//!
//! Rank 0 writes the same numbers as TensorBoard scalars, and the sample grids as images,
//! into `<output_dir>/tensorboard/` ([`crate::tensorboard`]).

use crate::tensorboard::EventWriter;
use crate::{Result, TrainerError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Progress of a running training.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainProgress {
    /// Optimiser steps done.
    pub step: u64,
    /// Target.
    pub max_steps: u64,
    /// Loss of the last step.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Images per second over the last logging window.
    pub images_per_s: f64,
}

/// `metrics.jsonl` and the window of steps since its last line.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    events: Option<EventWriter>,
    images_per_step: u64,
    window_losses: Vec<f64>,
    window_wait_s: f64,
    window_start: Instant,
    total_wait_s: f64,
}

impl MetricsLog {
    /// The log at `path`, resumed at `step`; only a `primary` rank writes the file, and its
    /// TensorBoard events in `tensorboard/` beside it. Every step trains `images_per_step`
    /// images over all ranks.
    pub fn open(path: &Path, step: u64, primary: bool, images_per_step: u64) -> Result<Self> {
        let (file, events) = if primary {
            let dir = path.parent().unwrap_or(Path::new(".")).join("tensorboard");
            (
                Some(open_truncated(path, step)?),
                Some(EventWriter::create(&dir, step)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            events,
            images_per_step,
            window_losses: Vec::new(),
            window_wait_s: 0.0,
            window_start: Instant::now(),
            total_wait_s: 0.0,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds one optimiser step: its loss (agreed over ranks) and the time it waited for data.
    pub fn record(&mut self, loss: f64, data_wait_s: f64) {
        self.window_losses.push(loss);
        self.window_wait_s += data_wait_s;
        self.total_wait_s += data_wait_s;
    }

    /// Writes the line of `step` (the window's figures plus `fields`, a JSON object) and
    /// starts a new window. On rank 0 it also logs the step.
    pub fn write(&mut self, step: u64, fields: serde_json::Value) -> Result<()> {
        let n = self.window_losses.len().max(1) as f64;
        let secs = self.window_start.elapsed().as_secs_f64();
        let images = (self.window_losses.len() as u64 * self.images_per_step) as f64;
        let loss = self.window_losses.last().copied().unwrap_or(f64::NAN);
        let mut line = serde_json::json!({
            "step": step,
            "loss": loss,
            "mean_loss": self.window_losses.iter().sum::<f64>() / n,
            "step_time_s": secs / n,
            "data_wait_s": self.window_wait_s / n,
            "images_per_s": images / secs.max(1e-9),
        });
        if let (Some(map), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
            map.extend(extra);
        }
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{line}")
                .and_then(|_| f.flush())
                .map_err(|e| TrainerError::io(&self.path, e))?;
            tracing::info!(step, loss, "step {line}");
        }
        if let Some(events) = self.events.as_mut() {
            let scalars: Vec<(String, f64)> = line
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(key, _)| key.as_str() != "step")
                .filter_map(|(key, v)| Some((key.clone(), v.as_f64()?)))
                .collect();
            events.scalars(step, &scalars)?;
        }
        self.window_losses.clear();
        self.window_wait_s = 0.0;
        self.window_start = Instant::now();
        Ok(())
    }

    /// Adds `values` as TensorBoard scalars at `step` (rank 0; the others write nothing):
    /// what a run measures beside its metrics lines, such as a held-out evaluation.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        match self.events.as_mut() {
            Some(events) => events.scalars(step, values),
            None => Ok(()),
        }
    }

    /// Adds the PNG at `path` (a sample grid) to the TensorBoard events at `step` under
    /// `tag` (rank 0; the others write nothing).
    pub fn image(&mut self, step: u64, tag: &str, path: &Path) -> Result<()> {
        match self.events.as_mut() {
            Some(events) => events.png_file(step, tag, path),
            None => Ok(()),
        }
    }

    /// Mean loss of the steps since the last line (`last` when there are none).
    pub fn mean_recent_loss(&self, last: f64) -> f64 {
        if self.window_losses.is_empty() {
            last
        } else {
            self.window_losses.iter().sum::<f64>() / self.window_losses.len() as f64
        }
    }

    /// Seconds this run waited for data in all.
    pub fn total_wait_s(&self) -> f64 {
        self.total_wait_s
    }
}

/// Opens the metrics file for appending, first dropping lines past `step` (left by a run
/// that died after its last checkpoint), so every step appears once.
fn open_truncated(path: &Path, step: u64) -> Result<std::fs::File> {
    let kept: Vec<String> = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(str::to_string)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(TrainerError::io(path, e)),
    };
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(path, body).map_err(|e| TrainerError::io(path, e))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| TrainerError::io(path, e))
}
