//! A trained CLIP as an HF CLIP directory: `config.json` (HF's `CLIPConfig` layout),
//! `model.safetensors` (the state-dict keys `CLIPModel` uses, which are our variable
//! names), `tokenizer.json` and `preprocessor_config.json`, plus `modality.json` (the mean
//! text and image embeddings of its training pairs, which `sample` uses to move prompts
//! across the modality gap; transformers ignores it). `embed.clip.checkpoint` loads it
//! as it is, and so does `transformers.CLIPModel.from_pretrained`.
//!
//! The directory is written beside itself first and renamed into place, so a reader never
//! sees half of one.

use crate::checkpoint::to_safetensors;
use crate::{Result, TrainerError};
use knn_indexer::clip::tokenizer::BOS_TOKEN;
use knn_indexer::clip::{ClipConfig, ClipImageProcessor, ModalityMeans, MODALITY_FILE};
use std::path::Path;
use tch::Tensor;

/// `config.json` for `cfg` in the layout transformers writes.
pub fn hf_config(cfg: &ClipConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("config serialises");
    let text = &mut v["text_config"];
    text["model_type"] = "clip_text_model".into();
    text["bos_token_id"] = i64::from(BOS_TOKEN.1).into();
    text["projection_dim"] = cfg.projection_dim.into();
    text["attention_dropout"] = 0.0.into();
    text["dropout"] = 0.0.into();
    text["initializer_range"] = 0.02.into();
    text["initializer_factor"] = 1.0.into();
    let vision = &mut v["vision_config"];
    vision["model_type"] = "clip_vision_model".into();
    vision["projection_dim"] = cfg.projection_dim.into();
    vision["attention_dropout"] = 0.0.into();
    vision["dropout"] = 0.0.into();
    vision["initializer_range"] = 0.02.into();
    vision["initializer_factor"] = 1.0.into();
    v["model_type"] = "clip".into();
    v["architectures"] = serde_json::json!(["CLIPModel"]);
    v["logit_scale_init_value"] = 2.6592.into();
    v["initializer_factor"] = 1.0.into();
    v["torch_dtype"] = "float32".into();
    v
}

/// Writes the HF directory `dir` from the model's parameters (names as in the VarStore).
pub fn write_hf_dir(
    dir: &Path,
    cfg: &ClipConfig,
    params: &[(String, Tensor)],
    tokenizer_json: &str,
    processor: &ClipImageProcessor,
    modality: &ModalityMeans,
) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| TrainerError::io(p, e);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let staging = dir.with_file_name(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
    let config = serde_json::to_vec_pretty(&hf_config(cfg)).expect("config serialises");
    let processor_json = processor.to_json();
    let files: [(&str, Vec<u8>); 5] = [
        ("config.json", config),
        ("model.safetensors", to_safetensors(params)?),
        ("tokenizer.json", tokenizer_json.as_bytes().to_vec()),
        ("preprocessor_config.json", processor_json.into_bytes()),
        (
            MODALITY_FILE,
            serde_json::to_vec_pretty(modality).expect("means serialise"),
        ),
    ];
    for (f, bytes) in files {
        let p = staging.join(f);
        std::fs::write(&p, bytes).map_err(|e| io(&p, e))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| io(dir, e))
}
