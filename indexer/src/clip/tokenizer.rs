//! CLIP text tokenisation through the `tokenizers` crate from a checkpoint's
//! `tokenizer.json`: the same library HF's `CLIPTokenizerFast` runs, padded and truncated to
//! the model's context length with begin/end tokens kept.

use std::path::Path;
use tch::Tensor;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// A tokenizer producing fixed-length `input_ids` for the text tower.
pub struct ClipTokenizer {
    inner: Tokenizer,
    context_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("context_length", &self.context_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads `tokenizer.json`; pads with `pad_id` to `context_length` tokens.
    pub fn from_file(path: &Path, context_length: usize, pad_id: u32) -> Result<Self, String> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| e.to_string())?;
        let pad_token = inner
            .id_to_token(pad_id)
            .unwrap_or_else(|| "<pad>".to_string());
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(context_length),
            pad_id,
            pad_token,
            ..Default::default()
        }));
        inner
            .with_truncation(Some(TruncationParams {
                max_length: context_length,
                ..Default::default()
            }))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            inner,
            context_length,
        })
    }

    /// Token ids `[texts, context_length]` (i64) for the text tower.
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor, String> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| e.to_string())?;
        let ids: Vec<i64> = encodings
            .iter()
            .flat_map(|e| e.get_ids().iter().map(|&i| i as i64))
            .collect();
        Ok(Tensor::from_slice(&ids).view([texts.len() as i64, self.context_length as i64]))
    }
}
