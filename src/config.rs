//! The project config file: one TOML with a table per stage, layered with figment as file →
//! `KNN_` environment → `--set` flags. Unknown keys are errors; a bad value's error names the
//! key and where the value came from (the file, or the environment variable).

use anyhow::{bail, Context, Result};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use knn_datasets::{SplitConfig, StorageConfig};
use knn_indexer::knn::{IndexConfig, KnnConfig};
use knn_indexer::score::ScoreConfig;
use knn_indexer::EmbedConfig;
use knn_trainer::eval::{EvalConfig, EvalPlan};
use knn_trainer::{TrainClipConfig, TrainConfig};
use serde::Deserialize;
use std::path::Path;

/// Everything a config file may hold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Credentials and endpoints for s3/gs/az URLs (all stages).
    #[serde(default)]
    pub storage: StorageConfig,
    /// The embed stage.
    pub embed: Option<EmbedConfig>,
    /// The build-index stage.
    pub index: Option<IndexConfig>,
    /// The score stage (a score column for tables without one).
    pub score: Option<ScoreConfig>,
    /// The precompute-knn stage.
    pub knn: Option<KnnConfig>,
    /// Training.
    pub train: Option<TrainConfig>,
    /// Training the project's own CLIP.
    pub train_clip: Option<TrainClipConfig>,
    /// The held-out split every stage honours: its records are never trained on, by the
    /// CLIP or the diffusion model, and never a training row's neighbour; `eval` scores on
    /// them. Absent: `train-clip` holds out its default split, `precompute-knn` nothing
    /// (tables without a `key` column, for one, cannot be split).
    pub split: Option<SplitConfig>,
    /// `eval`: the paper's claims measured at small scale.
    pub eval: Option<EvalConfig>,
}

impl ProjectConfig {
    /// The embeddings table the stages after embed read: embed's output.
    fn embeddings_table(&self) -> Option<String> {
        self.embed.as_ref().map(|e| e.output.table.clone())
    }

    /// A stage's `table` setting, or embed's output; an error naming `section.table` when
    /// neither is set.
    fn table_or_embeddings(
        &self,
        table: Option<String>,
        section: &str,
        path: &Path,
    ) -> Result<String> {
        match table.or_else(|| self.embeddings_table()) {
            Some(t) => Ok(t),
            None => bail!(
                "config `{}` names no embeddings table: set `{section}.table` or `embed.output.table`",
                path.display()
            ),
        }
    }

    /// The tables sharded stages commit to, as this config names them: embed's table and
    /// rejects table, precompute-knn's output.
    pub fn sharded_tables(&self, path: &Path) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if let Some(e) = &self.embed {
            out.push(e.output.table.clone());
            out.push(e.output.rejects_url());
        }
        if self.knn.is_some() || self.embed.is_some() {
            out.push(self.knn(path)?.output_uri()?);
        }
        Ok(out)
    }

    /// `[index]`, with the table defaulting to embed's output.
    pub fn index(&self, path: &Path) -> Result<IndexConfig> {
        let mut cfg = self.index.clone().unwrap_or_default();
        cfg.table = Some(self.table_or_embeddings(cfg.table, "index", path)?);
        Ok(cfg)
    }

    /// `[score]`, with the table defaulting to embed's output.
    pub fn score(&self, path: &Path) -> Result<ScoreConfig> {
        let mut cfg = self.score.clone().unwrap_or_default();
        cfg.table = Some(self.table_or_embeddings(cfg.table, "score", path)?);
        Ok(cfg)
    }

    /// `[knn]`, with the table defaulting to embed's output.
    pub fn knn(&self, path: &Path) -> Result<KnnConfig> {
        let mut cfg = match self.knn.clone() {
            Some(c) => c,
            None => toml::from_str("").context("default [knn] config")?,
        };
        cfg.table = Some(self.table_or_embeddings(cfg.table, "knn", path)?);
        cfg.split = cfg.split.or_else(|| self.split.clone());
        Ok(cfg)
    }
}

impl ProjectConfig {
    /// `[train_clip]` (its defaults when absent), with the split defaulting to `[split]`;
    /// `judge` turns it into the judge CLIP's.
    pub fn train_clip(&self, path: &Path, judge: bool) -> Result<TrainClipConfig> {
        let mut cfg = match self.train_clip.clone() {
            Some(c) => c,
            None => toml::from_str("").context("default [train_clip] config")?,
        };
        if cfg.split.is_none() {
            cfg.split = Some(self.split.clone().unwrap_or_default());
        }
        if judge {
            cfg = cfg.for_judge();
        }
        cfg.validate()
            .with_context(|| format!("config `{}`", path.display()))?;
        Ok(cfg)
    }

    /// `[train]`, with the tables defaulting to embed's output and precompute-knn's output.
    pub fn train(&self, path: &Path) -> Result<TrainConfig> {
        let mut cfg = match self.train.clone() {
            Some(c) => c,
            None => toml::from_str("").context("default [train] config")?,
        };
        cfg.data.embeddings = cfg.data.embeddings.or_else(|| self.embeddings_table());
        if cfg.data.knn.is_none() {
            if let Ok(knn) = self.knn(path) {
                cfg.data.knn = Some(knn.output_uri()?);
            }
        }
        if cfg.data.embeddings.is_none() || cfg.data.knn.is_none() {
            bail!(
                "config `{}` names no training tables: set `train.data.embeddings` and \
                 `train.data.knn`, or `embed.output.table`",
                path.display()
            );
        }
        Ok(cfg)
    }
}

impl ProjectConfig {
    /// What `eval` needs, every default resolved: `[eval]` (its defaults when absent), the
    /// training config, the `[knn]`, `[embed]` and `[score]` settings, the CLIPs, the
    /// captions table and the split.
    pub fn eval_plan(&self, path: &Path, quick: bool) -> Result<EvalPlan> {
        let eval = match self.eval.clone() {
            Some(c) => c,
            None => toml::from_str("").context("default [eval] config")?,
        };
        let train = self.train(path)?;
        let knn = self.knn(path)?;
        let clip_cfg = self.train_clip(path, false)?;
        let captions = eval
            .captions
            .clone()
            .unwrap_or_else(|| knn_trainer::train_clip::captions::table_uri(&clip_cfg));
        let embed = self.embed.clone();
        let clip = match &embed {
            Some(e) => e.clip.clone(),
            None => bail!(
                "config `{}` has no [embed] table: eval embeds the prompts with its CLIP",
                path.display()
            ),
        };
        let judge = match eval.judge.clone() {
            Some(j) => j,
            None => {
                let mut j = clip.clone();
                j.checkpoint = Some(self.train_clip(path, true)?.export_dir());
                j
            }
        };
        Ok(EvalPlan {
            quick,
            train,
            knn,
            embed,
            clip,
            judge,
            captions,
            score: self.score(path)?,
            split: self.split.clone().unwrap_or_default(),
            eval,
            launcher: None,
        })
    }
}

/// One `--set KEY=VALUE` flag as a figment provider, so an error in its value names the
/// flag the user typed (figment would name this file's line).
struct SetFlag {
    key: String,
    value: toml::Value,
    flag: String,
}

impl figment::Provider for SetFlag {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("flag `--set {}`", self.flag))
    }

    fn data(
        &self,
    ) -> std::result::Result<
        figment::value::Map<figment::Profile, figment::value::Dict>,
        figment::Error,
    > {
        figment::providers::Serialized::default(&self.key, &self.value).data()
    }
}

/// Loads `path`, then `KNN_*` env vars, then `key=value` overrides.
pub fn load(path: &Path, overrides: &[String]) -> Result<ProjectConfig> {
    if !path.is_file() {
        bail!(
            "config file `{}` not found (run from the repository root, or pass an absolute path)",
            path.display()
        );
    }
    let mut fig = Figment::new()
        .merge(Toml::file_exact(path))
        .merge(Env::prefixed("KNN_").split("__"));
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .with_context(|| format!("--set `{o}`: expected KEY=VALUE"))?;
        let key = key.trim();
        // A TOML literal (number, bool, array, quoted string), else the text as a string.
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        fig = fig.merge(SetFlag {
            key: key.to_string(),
            value: parsed,
            flag: o.clone(),
        });
    }
    let cfg = fig.extract::<ProjectConfig>().map_err(|e| {
        // figment prefixes keys with its profile name (`default.`); users never wrote it.
        let msgs: Vec<String> = e
            .into_iter()
            .map(|e| e.to_string().replace("key \"default.", "key \""))
            .collect();
        anyhow::anyhow!("invalid config: {}", msgs.join("; "))
    })?;
    cfg.storage
        .retry
        .validate()
        .with_context(|| format!("invalid config `{}`", path.display()))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A TOML line from the project's own vocabulary, with values of every type and some
    /// out of range, or raw noise.
    fn line() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "[embed.source]",
            "[embed.output]",
            "[embed.clip]",
            "[embed.decode]",
            "[storage]",
            "[storage.retry]",
            "[storage.tables]",
            "[knn]",
            "[train]",
            "[train.optim]",
            "[train.checkpoint]",
            "[index]",
            "[score]",
            "url",
            "format",
            "table",
            "batch_size",
            "max_pixels",
            "timeout_ms",
            "k",
            "max_steps",
            "lr",
            "every_steps",
            "max_retries",
            "retry_timeout_s",
            "init_backoff_ms",
            "keep_versions_hours",
            "image_size_px",
            "device",
            "output",
            "output_dir",
            "secret_access_key",
            "folder_shard_size",
        ]);
        let value = prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:?}")),
            "[a-z0-9:/._-]{0,16}".prop_map(|s| format!("\"{s}\"")),
            any::<bool>().prop_map(|b| b.to_string()),
            Just("[1, \"x\", 2.5]".to_string()),
            Just("{ a = 1 }".to_string()),
        ];
        prop_oneof![
            4 => (key, value).prop_map(|(k, v)| if k.starts_with('[') { k.to_string() } else { format!("{k} = {v}") }),
            1 => "\\PC{0,24}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("FUZZ_CASES").map_or(256, |v| v.parse().expect("FUZZ_CASES")),
            ..ProptestConfig::default()
        })]

        /// Any file and any `--set` give a config or an error that says something, never a
        /// panic; a stage's section is checked when asked for, and that never panics either.
        #[test]
        fn any_config_loads_or_is_refused_with_a_message(
            lines in proptest::collection::vec(line(), 0..16),
            set in proptest::collection::vec("[a-z._]{1,20}=[a-z0-9\"._-]{0,10}", 0..3),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("job.toml");
            std::fs::write(&path, lines.join("\n")).unwrap();
            match load(&path, &set) {
                Ok(project) => {
                    let _ = project.index(&path);
                    let _ = project.score(&path);
                    let _ = project.knn(&path);
                    let _ = project.train(&path);
                    let _ = project.sharded_tables(&path);
                }
                Err(e) => {
                    let said = format!("{e:#}");
                    prop_assert!(!said.trim().is_empty());
                }
            }
        }
    }
}
