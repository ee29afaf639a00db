//! The `score` stage: a score column for an embeddings table that has none, so that
//! `sample` can condition on neighbours from one score bucket (PAPER.md §4.2). Tables
//! embedded from LAION-style parquet carry their own (`embed.source.columns`); for the
//! offline default the scorer is a documented proxy, **colourfulness** (Hasler & Süsstrunk
//! 2003), computed on each row's stored image:
//!
//! rg = R − G, yb = (R + G)/2 − B over the pixels (0–255), and
//! M = √(σ²_rg + σ²_yb) + 0.3 √(μ²_rg + μ²_yb):
//! 0 for grey, about 15 for muted, 45 for average and over 100 for extremely colourful images.
//!
//! The column is added in one Lance commit (`add_columns` reading `id` and `image`, fragment
//! by fragment), so a crash leaves the table as it was. A row whose image does not decode
//! gets a null score and is counted and named in the summary. A table is scored once: a
//! second run into the same column is refused. Score after the embed stage has finished: a
//! rerun of `embed` still skips the table's committed shards, but refuses to append new
//! rows, which would lack the score.

use crate::table::load_dataset;
use crate::{IndexerError, Result};
use arrow_array::{cast::AsArray, Float64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use knn_datasets::StorageConfig;
use lance::dataset::{BatchUDF, NewColumnTransform};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The `score` stage's config (`[score]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// The embeddings table (default: `embed.output.table`).
    #[serde(default)]
    pub table: Option<String>,
    /// The column to add.
    #[serde(default = "default_column")]
    pub column: String,
    /// The scorer: `colourfulness` (the only one so far).
    #[serde(default)]
    pub scorer: Scorer,
}

fn default_column() -> String {
    "score".into()
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            table: None,
            column: default_column(),
            scorer: Scorer::default(),
        }
    }
}

/// How a row is scored.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scorer {
    /// Hasler & Süsstrunk's colourfulness of the stored image.
    #[default]
    Colourfulness,
}

/// What a `score` run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScoreSummary {
    /// The table.
    pub table: String,
    /// The column added.
    pub column: String,
    /// The table's version with the column.
    pub version: u64,
    /// Rows scored.
    pub scored: u64,
    /// Rows whose image did not decode (null score): (id, reason), the first 20.
    pub unscored: Vec<(u64, String)>,
    /// How many rows got a null score in all.
    pub unscored_total: u64,
    /// Mean and range of the scores.
    pub mean: f64,
    /// The lowest score.
    pub min: f64,
    /// The highest score.
    pub max: f64,
    /// Wall time.
    pub seconds: f64,
}

impl fmt::Display for ScoreSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "score: {} rows of `{}` scored into column `{}` (version {}) in {:.1} s; \
             mean {:.2}, range {:.2}..{:.2}",
            self.scored,
            self.table,
            self.column,
            self.version,
            self.seconds,
            self.mean,
            self.min,
            self.max
        )?;
        if self.unscored_total > 0 {
            writeln!(
                f,
                "  {} rows left null (image did not decode):",
                self.unscored_total
            )?;
            for (id, why) in &self.unscored {
                writeln!(f, "    id {id}: {why}")?;
            }
        }
        Ok(())
    }
}

/// Hasler & Süsstrunk's colourfulness of 8-bit RGB pixels (`[r, g, b, r, g, b, …]`).
pub fn colourfulness(rgb: &[u8]) -> f64 {
    let n = (rgb.len() / 3) as f64;
    if n == 0.0 {
        return 0.0;
    }
    let (mut s_rg, mut s_yb, mut q_rg, mut q_yb) = (0.0, 0.0, 0.0, 0.0);
    for p in rgb.chunks_exact(3) {
        let (r, g, b) = (p[0] as f64, p[1] as f64, p[2] as f64);
        let rg = r - g;
        let yb = 0.5 * (r + g) - b;
        s_rg += rg;
        s_yb += yb;
        q_rg += rg * rg;
        q_yb += yb * yb;
    }
    let (m_rg, m_yb) = (s_rg / n, s_yb / n);
    let var_rg = (q_rg / n - m_rg * m_rg).max(0.0);
    let var_yb = (q_yb / n - m_yb * m_yb).max(0.0);
    (var_rg + var_yb).sqrt() + 0.3 * (m_rg * m_rg + m_yb * m_yb).sqrt()
}

/// Tally shared with the per-batch scorer.
#[derive(Default)]
struct Tally {
    scored: u64,
    sum: f64,
    min: f64,
    max: f64,
    unscored: Vec<(u64, String)>,
    unscored_total: u64,
}

/// Scores one batch of (`id`, `image`) rows into a batch of `out` (the one score column).
fn score_batch(
    batch: &RecordBatch,
    out: &SchemaRef,
    tally: &Mutex<Tally>,
) -> lance::Result<RecordBatch> {
    let ids = batch
        .column_by_name("id")
        .and_then(|c| c.as_primitive_opt::<arrow_array::types::UInt64Type>())
        .ok_or_else(|| lance::Error::invalid_input("`id` is not a u64 column"))?;
    let images = batch
        .column_by_name("image")
        .and_then(|c| c.as_binary_opt::<i32>())
        .ok_or_else(|| lance::Error::invalid_input("`image` is not a binary column"))?;
    let mut t = tally.lock().expect("tally");
    let scores: Float64Array = (0..batch.num_rows())
        .map(|i| match image::load_from_memory(images.value(i)) {
            Ok(img) => {
                let s = colourfulness(img.to_rgb8().as_raw());
                if t.scored == 0 {
                    (t.min, t.max) = (s, s);
                }
                t.scored += 1;
                t.sum += s;
                t.min = t.min.min(s);
                t.max = t.max.max(s);
                Some(s)
            }
            Err(e) => {
                t.unscored_total += 1;
                if t.unscored.len() < 20 {
                    t.unscored.push((ids.value(i), format!("image: {e}")));
                }
                None
            }
        })
        .collect();
    RecordBatch::try_new(out.clone(), vec![Arc::new(scores)])
        .map_err(|e| lance::Error::invalid_input(format!("score batch: {e}")))
}

/// Adds `cfg.column` to the table, scoring every row.
pub async fn score(cfg: &ScoreConfig, storage: &StorageConfig) -> Result<ScoreSummary> {
    let started = Instant::now();
    let uri = cfg.table.as_deref().ok_or_else(|| IndexerError::Config {
        key: "score.table".into(),
        reason: "no embeddings table: set `score.table` (or `embed.output.table`)".into(),
    })?;
    let column = cfg.column.trim();
    if column.is_empty() {
        return Err(IndexerError::Config {
            key: "score.column".into(),
            reason: "must name a column".into(),
        });
    }
    let mut ds = load_dataset(uri, &storage.to_lance_options(), None)
        .await
        .map_err(|e| IndexerError::lance(uri, e))?;
    let schema = ds.schema();
    for need in ["id", "image"] {
        if schema.field(need).is_none() {
            return Err(IndexerError::SchemaMismatch {
                table: uri.into(),
                detail: format!(
                    "it has no `{need}` column; `score` reads the embed stage's tables"
                ),
            });
        }
    }
    if schema.field(column).is_some() {
        return Err(IndexerError::Config {
            key: "score.column".into(),
            reason: format!(
                "table `{uri}` already has a column `{column}`; name another column to add"
            ),
        });
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let out: SchemaRef = Arc::new(Schema::new(vec![Field::new(
        column,
        DataType::Float64,
        true,
    )]));
    let (t, schema) = (tally.clone(), out.clone());
    let udf = BatchUDF {
        mapper: Box::new(move |b: &RecordBatch| score_batch(b, &schema, &t)),
        output_schema: out,
        result_checkpoint: None,
    };
    ds.add_columns(
        NewColumnTransform::BatchUDF(udf),
        Some(vec!["id".into(), "image".into()]),
        Some(256),
    )
    .await
    .map_err(|e| IndexerError::lance(uri, e))?;
    let t = tally.lock().expect("tally");
    Ok(ScoreSummary {
        table: uri.into(),
        column: column.into(),
        version: ds.version().version,
        scored: t.scored,
        unscored: t.unscored.clone(),
        unscored_total: t.unscored_total,
        mean: if t.scored > 0 {
            t.sum / t.scored as f64
        } else {
            0.0
        },
        min: t.min,
        max: t.max,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_is_zero_and_saturated_colour_scores_high() {
        let grey: Vec<u8> = (0..300)
            .map(|i| (i / 3) as u8)
            .flat_map(|v| [v, v, v])
            .collect();
        assert!(colourfulness(&grey) < 1e-9);
        let red: Vec<u8> = [255u8, 0, 0].repeat(100);
        // rg = 255, yb = 127.5, no spread: 0.3 * sqrt(255² + 127.5²).
        let want = 0.3 * (255f64.powi(2) + 127.5f64.powi(2)).sqrt();
        assert!((colourfulness(&red) - want).abs() < 1e-9);
        let mixed: Vec<u8> = [[255u8, 0, 0], [0, 0, 255]].concat().repeat(50);
        assert!(colourfulness(&mixed) > colourfulness(&red));
    }
}
