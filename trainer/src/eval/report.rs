//! The evaluation's results: per seed as measured, then over seeds (mean ± std), the
//! paper's claims each with a verdict, and `report.md` / `report.json`.
//!
//! A claim's verdict compares the two sides seed by seed: *reproduced* when every seed
//! moves in the paper's direction, *mixed* when some do, *not reproduced* when none does.

use super::arms::Arm;
use super::measure::Measures;
use crate::{Result, TrainerError};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// What one seed's arms measured.
#[derive(Clone, Debug, Serialize)]
pub struct SeedResult {
    /// The seed.
    pub seed: u64,
    /// The no-kNN arm (k = 0).
    pub no_knn: Measures,
    /// The kNN arm at each inference k of the sweep.
    pub sweep: Vec<(usize, Measures)>,
    /// Style shares of the kNN arm's samples (headline k) per retrieval table: (table,
    /// share nearest each style's centroid, in [`Report::styles`] order).
    pub swap: Vec<(String, Vec<f64>)>,
    /// Mean output score per score bucket, lowest bucket first.
    pub buckets: Vec<f64>,
    /// Seconds spent sampling and measuring this seed.
    pub sample_seconds: f64,
}

/// Mean and sample standard deviation over seeds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1; 0 for one value).
    pub std: f64,
    /// The values, one per seed.
    pub values: Vec<f64>,
}

impl Stat {
    /// Over `values`.
    pub fn of(values: Vec<f64>) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = if values.len() > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Self { mean, std, values }
    }
}

impl std::fmt::Display for Stat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = if self.mean.abs() >= 10.0 { 2 } else { 3 };
        write!(f, "{:.*} ± {:.*}", digits, self.mean, digits, self.std)
    }
}

/// How a claim fared.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every seed moved in the paper's direction.
    Reproduced,
    /// Some seeds did.
    Mixed,
    /// None did.
    NotReproduced,
}

impl Verdict {
    /// From per-seed outcomes (true: the paper's direction).
    pub fn of(outcomes: &[bool]) -> Self {
        let held = outcomes.iter().filter(|&&b| b).count();
        if held == outcomes.len() && held > 0 {
            Verdict::Reproduced
        } else if held > 0 {
            Verdict::Mixed
        } else {
            Verdict::NotReproduced
        }
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::Reproduced => "reproduced",
            Verdict::Mixed => "mixed",
            Verdict::NotReproduced => "not reproduced",
        }
    }
}

/// One of the paper's claims, as tested.
#[derive(Clone, Debug, Serialize)]
pub struct Claim {
    /// The claim.
    pub claim: String,
    /// Its verdict.
    pub verdict: Verdict,
    /// The numbers behind it.
    pub detail: String,
}

/// Fixed facts of the run that the report states.
#[derive(Clone, Debug, Serialize)]
pub struct RunFacts {
    /// `--quick` or full.
    pub quick: bool,
    /// The training table.
    pub table: String,
    /// Held-out rows evaluated (with a caption), of all held-out rows.
    pub prompts: usize,
    /// All held-out rows of the table.
    pub held_out_rows: usize,
    /// Held-out rows without a caption (left out).
    pub uncaptioned: usize,
    /// Steps and batch of every arm.
    pub steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// k the kNN arm trained with.
    pub knn_k: usize,
    /// The k compared with k = 0.
    pub headline_k: usize,
    /// Sampler and guidance.
    pub sampler: String,
    /// R-precision distractors per image.
    pub distractors: usize,
    /// k of the k-NN balls of precision and recall.
    pub pr_k: usize,
    /// The pipeline's CLIP and the judge's.
    pub clip: String,
    /// The judge CLIP.
    pub judge: String,
    /// Device.
    pub device: String,
    /// Prompts per score bucket.
    pub bucket_prompts: usize,
}

/// The whole evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was run.
    pub facts: RunFacts,
    /// The arms used.
    pub arms: Vec<Arm>,
    /// Per seed.
    pub seeds: Vec<SeedResult>,
    /// The nearest-neighbour retrieval baseline (the top retrieved image as the sample).
    pub nn_retrieval: Measures,
    /// Training images (as many as prompts) against the held-out images: the floor of
    /// FD_CLIP at this sample size.
    pub train_images: Measures,
    /// The held-out images with their own captions: the ceiling of the text alignment.
    pub held_out_images: Measures,
    /// Styles of the swap, in share order (`own` is the training table).
    pub styles: Vec<String>,
    /// Mean score of the held-out images (the scale of the bucket scores).
    pub held_out_score: f64,
    /// The claims.
    pub claims: Vec<Claim>,
    /// Wall seconds: all, training, sampling and measuring.
    pub seconds: (f64, f64, f64),
    /// Sample grids written.
    pub grids: Vec<String>,
}

/// One value per seed, over seeds.
fn over_seeds(seeds: &[SeedResult], f: impl Fn(&SeedResult) -> f64) -> Stat {
    Stat::of(seeds.iter().map(f).collect())
}

/// The measures of the kNN arm at `k` in seed `s`.
fn at_k(s: &SeedResult, k: usize) -> Measures {
    s.sweep
        .iter()
        .find(|(kk, _)| *kk == k)
        .map(|(_, m)| *m)
        .expect("the sweep holds the headline k")
}

/// The claims tested, from the per-seed results.
pub fn claims(seeds: &[SeedResult], styles: &[String], headline_k: usize) -> Vec<Claim> {
    let mut out = Vec::new();
    for (i, (name, _, higher)) in seeds[0].no_knn.named().iter().enumerate() {
        if matches!(*name, "precision" | "recall") {
            continue;
        }
        let knn = over_seeds(seeds, |s| at_k(s, headline_k).named()[i].1);
        let none = over_seeds(seeds, |s| s.no_knn.named()[i].1);
        let outcomes: Vec<bool> = knn
            .values
            .iter()
            .zip(&none.values)
            .map(|(a, b)| if *higher { a > b } else { a < b })
            .collect();
        out.push(Claim {
            claim: format!(
                "kNN conditioning (k = {headline_k}) beats the same model without kNN on {name}"
            ),
            verdict: Verdict::of(&outcomes),
            detail: format!("k = {headline_k}: {knn}; k = 0: {none}"),
        });
    }
    let ks: Vec<usize> = seeds[0].sweep.iter().map(|(k, _)| *k).collect();
    if ks.contains(&10) && ks.len() > 1 {
        for (i, (name, _, higher)) in seeds[0].no_knn.named().iter().enumerate() {
            if !matches!(*name, "fd_clip" | "clip_score") {
                continue;
            }
            let best_per_seed: Vec<usize> = seeds
                .iter()
                .map(|s| {
                    let pick = s.sweep.iter().map(|(k, m)| (*k, m.named()[i].1));
                    if *higher {
                        pick.max_by(|a, b| a.1.total_cmp(&b.1))
                    } else {
                        pick.min_by(|a, b| a.1.total_cmp(&b.1))
                    }
                    .map(|(k, _)| k)
                    .unwrap_or(0)
                })
                .collect();
            let means: Vec<String> = ks
                .iter()
                .map(|&k| format!("k={k}: {}", over_seeds(seeds, |s| at_k(s, k).named()[i].1)))
                .collect();
            out.push(Claim {
                claim: format!("k = 10 is the best inference k on {name}"),
                verdict: Verdict::of(&best_per_seed.iter().map(|&k| k == 10).collect::<Vec<_>>()),
                detail: format!("best k per seed {best_per_seed:?}; {}", means.join("; ")),
            });
        }
    }
    for (si, style) in styles.iter().enumerate().skip(1) {
        let share = |s: &SeedResult, table: &str| {
            s.swap
                .iter()
                .find(|(t, _)| t == table)
                .map(|(_, v)| v[si])
                .unwrap_or(f64::NAN)
        };
        let swapped = over_seeds(seeds, |s| share(s, style));
        let own = over_seeds(seeds, |s| share(s, "own"));
        let outcomes: Vec<bool> = swapped
            .values
            .iter()
            .zip(&own.values)
            .map(|(a, b)| a > b)
            .collect();
        out.push(Claim {
            claim: format!(
                "swapping the retrieval table to `{style}` moves the samples towards its style"
            ),
            verdict: Verdict::of(&outcomes),
            detail: format!(
                "share nearest the `{style}` centroid: retrieving from `{style}` {swapped}, \
                 from the training table {own}"
            ),
        });
    }
    if seeds[0].buckets.len() > 1 {
        let outcomes: Vec<bool> = seeds
            .iter()
            .map(|s| s.buckets.last() > s.buckets.first())
            .collect();
        let per: Vec<String> = (0..seeds[0].buckets.len())
            .map(|b| format!("{}: {}", b + 1, over_seeds(seeds, |s| s.buckets[b])))
            .collect();
        let rho = Stat::of(
            seeds
                .iter()
                .map(|s| spearman_with_rank(&s.buckets))
                .collect(),
        );
        out.push(Claim {
            claim: "score buckets order the outputs' score (top bucket above bottom)".into(),
            verdict: Verdict::of(&outcomes),
            detail: format!(
                "mean output score per bucket {}; Spearman of bucket vs score {rho}",
                per.join(", ")
            ),
        });
    }
    out
}

/// A Markdown table row: `name`, then each measure of `get` as mean ± std over seeds.
fn stat_row(seeds: &[SeedResult], name: &str, get: impl Fn(&SeedResult) -> Measures) -> String {
    let cells: Vec<String> = (0..5)
        .map(|i| over_seeds(seeds, |r| get(r).named()[i].1).to_string())
        .collect();
    format!("| {name} | {} |\n", cells.join(" | "))
}

/// Spearman's rank correlation of `values` with their positions 0, 1, 2, …
fn spearman_with_rank(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 2 {
        return f64::NAN;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut rank = vec![0.0; n];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r as f64;
    }
    let d2: f64 = rank
        .iter()
        .enumerate()
        .map(|(i, r)| (r - i as f64).powi(2))
        .sum();
    1.0 - 6.0 * d2 / (n as f64 * ((n * n) as f64 - 1.0))
}

impl Report {
    /// Writes `report.json` and `report.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        let json = serde_json::to_string_pretty(self).expect("the report serialises");
        let path = dir.join("report.json");
        std::fs::write(&path, json).map_err(|e| TrainerError::io(&path, e))?;
        let path = dir.join("report.md");
        std::fs::write(&path, self.markdown()).map_err(|e| TrainerError::io(&path, e))
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let f = &self.facts;
        let s = &self.seeds;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# knn-diffusion eval{}\n",
            if f.quick { " (--quick)" } else { "" }
        );
        let _ = writeln!(
            md,
            "{} held-out captions of `{}` ({} held-out rows, {} without a caption); {} seeds; \
             every arm {} steps × {} images; kNN arm trained at k = {} with neighbour-count \
             dropout; sampler {}; judge CLIP `{}` (the pipeline's CLIP is `{}`); device {}. \
             Wall time {:.1} min ({:.1} training, {:.1} sampling and measuring).\n",
            f.prompts,
            f.table,
            f.held_out_rows,
            f.uncaptioned,
            s.len(),
            f.steps,
            f.batch_size,
            f.knn_k,
            f.sampler,
            f.judge,
            f.clip,
            f.device,
            self.seconds.0 / 60.0,
            self.seconds.1 / 60.0,
            self.seconds.2 / 60.0
        );
        let _ = writeln!(md, "## Claims\n");
        for c in &self.claims {
            let _ = writeln!(md, "- **{}**: {}. {}", c.verdict.text(), c.claim, c.detail);
        }
        let _ = writeln!(
            md,
            "\n## kNN against no kNN, and baselines\n\nFD_CLIP and precision/recall (k = {}) \
             against the held-out images, CLIP score and R-precision ({} distractors, chance \
             {:.3}) against their captions, all in the judge CLIP's space; mean ± std over \
             seeds.\n",
            f.pr_k,
            f.distractors,
            1.0 / (f.distractors + 1) as f64
        );
        let _ = writeln!(
            md,
            "| | FD_CLIP ↓ | precision ↑ | recall ↑ | CLIP score ↑ | R-precision ↑ |\n|---|---|---|---|---|---|"
        );
        md.push_str(&stat_row(s, &format!("kNN, k = {}", f.headline_k), |r| {
            at_k(r, f.headline_k)
        }));
        md.push_str(&stat_row(s, "no kNN (k = 0)", |r| r.no_knn));
        let fixed = |name: &str, m: &Measures| {
            let cells: Vec<String> = m
                .named()
                .iter()
                .map(|(_, v, _)| {
                    if v.is_nan() {
                        "—".into()
                    } else {
                        format!("{v:.3}")
                    }
                })
                .collect();
            format!("| {name} | {} |\n", cells.join(" | "))
        };
        md.push_str(&fixed(
            "NN retrieval (top retrieved image)",
            &self.nn_retrieval,
        ));
        md.push_str(&fixed("training images (floor of FD)", &self.train_images));
        md.push_str(&fixed(
            "held-out images themselves (alignment ceiling)",
            &self.held_out_images,
        ));
        let _ = writeln!(
            md,
            "\n## Inference k (the kNN arm)\n\n| k | FD_CLIP ↓ | precision ↑ | recall ↑ | CLIP score ↑ | R-precision ↑ |\n|---|---|---|---|---|---|"
        );
        for (k, _) in &s[0].sweep {
            md.push_str(&stat_row(s, &k.to_string(), |r| at_k(r, *k)));
        }
        self.swap_and_buckets_md(&mut md);
        self.arms_and_grids_md(&mut md);
        md
    }

    /// The table-swap and score-bucket sections.
    fn swap_and_buckets_md(&self, md: &mut String) {
        let (f, s) = (&self.facts, &self.seeds);
        if !s[0].swap.is_empty() {
            let _ = writeln!(
                md,
                "\n## Retrieval-table swap (k = {})\n\nShare of samples nearest each style's \
                 centroid in the judge's image space (`own`: the training table).\n",
                f.headline_k
            );
            let _ = writeln!(
                md,
                "| retrieved from | {} |\n|---|{}",
                self.styles.join(" | "),
                "---|".repeat(self.styles.len())
            );
            for (t, _) in &s[0].swap {
                let cells: Vec<String> = (0..self.styles.len())
                    .map(|j| {
                        over_seeds(s, |r| {
                            r.swap
                                .iter()
                                .find(|(tt, _)| tt == t)
                                .map(|(_, v)| v[j])
                                .unwrap_or(f64::NAN)
                        })
                        .to_string()
                    })
                    .collect();
                let _ = writeln!(md, "| {t} | {} |", cells.join(" | "));
            }
        }
        if !s[0].buckets.is_empty() {
            let _ = writeln!(
                md,
                "\n## Score buckets (k = {}, {} prompts)\n\nMean colourfulness of the samples \
                 conditioned on each bucket of the score (1: lowest); the held-out images \
                 average {:.1}.\n\n| bucket | output score |\n|---|---|",
                f.headline_k, f.bucket_prompts, self.held_out_score
            );
            for b in 0..s[0].buckets.len() {
                let _ = writeln!(md, "| {} | {} |", b + 1, over_seeds(s, |r| r.buckets[b]));
            }
        }
    }

    /// The arms used and the grids written.
    fn arms_and_grids_md(&self, md: &mut String) {
        let _ = writeln!(md, "\n## Arms\n\n| seed | arm | steps | trained now (s) | checkpoints |\n|---|---|---|---|---|");
        for a in &self.arms {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | `{}` |",
                a.seed,
                a.kind.name(),
                a.steps.map_or("given".into(), |s| s.to_string()),
                a.train_seconds,
                a.checkpoints
            );
        }
        if !self.grids.is_empty() {
            let _ = writeln!(md, "\n## Grids\n");
            for g in &self.grids {
                let _ = writeln!(md, "- `{g}`");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_verdicts_and_rank_correlation() {
        let s = Stat::of(vec![1.0, 2.0, 3.0]);
        assert_eq!((s.mean, s.std), (2.0, 1.0));
        assert_eq!(Stat::of(vec![5.0]).std, 0.0);
        assert_eq!(Verdict::of(&[true, true, true]), Verdict::Reproduced);
        assert_eq!(Verdict::of(&[true, false, true]), Verdict::Mixed);
        assert_eq!(Verdict::of(&[false, false]), Verdict::NotReproduced);
        assert!((spearman_with_rank(&[1.0, 2.0, 3.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!((spearman_with_rank(&[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }
}
