//! The text side of a loaded CLIP, `f_txt` of PAPER.md: texts → token ids → L2-normalised
//! embeddings in the joint space, where prompts query the image index.

use super::{l2_normalize, LoadedClip};
use crate::{IndexerError, Result};
use tch::{Kind, Tensor};

impl LoadedClip {
    /// Token ids `[texts, context]` for the text tower: the checkpoint's tokenizer, or for
    /// the random-weight CLIP byte tokens.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Tensor> {
        match (&self.tokenizer, self.random) {
            (Some(tok), _) => tok.encode(texts).map_err(|e| IndexerError::Config {
                key: "embed.clip.checkpoint".into(),
                reason: format!("tokenizer.json: {e}"),
            }),
            (None, true) => Ok(self.byte_tokens(texts)),
            (None, false) => Err(IndexerError::Config {
                key: "embed.clip.checkpoint".into(),
                reason: "the CLIP checkpoint has no tokenizer.json; embedding text needs one \
                         (copy the model's tokenizer.json beside config.json)"
                    .into(),
            }),
        }
    }

    /// L2-normalised text embeddings `[texts, d]` (f32) on the model's device.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let ids = self.tokenize(texts)?.to_device(self.vs.device());
        let feats = tch::no_grad(|| self.model.text_features(&ids));
        Ok(l2_normalize(&feats.to_kind(Kind::Float)))
    }

    /// Prompt embeddings for retrieval and conditioning `[texts, d]`: the text embeddings
    /// moved across the modality gap, `normalize(t - text_mean + image_mean)`, when the CLIP
    /// records its means ([`super::checkpoint::ModalityMeans`]); else the text embeddings.
    ///
    /// Why: a small CLIP's text embeddings sit apart from its image embeddings, and the
    /// images nearest the mean text direction come first for every prompt (hubs). Removing
    /// the text mean removes that shared term from every similarity; adding the image mean
    /// puts the query where the image embeddings the diffusion model trained on live.
    pub fn embed_prompts(&self, texts: &[&str]) -> Result<Tensor> {
        let t = self.embed_texts(texts)?;
        let Some(m) = &self.modality else {
            return Ok(t);
        };
        let device = t.device();
        let shift = Tensor::from_slice(&m.image_mean) - Tensor::from_slice(&m.text_mean);
        Ok(l2_normalize(&(t + shift.to_device(device).unsqueeze(0))))
    }

    /// Token ids for a CLIP without a tokenizer (the random-weight CLIP of the embedded
    /// default): UTF-8 bytes mapped into the vocabulary between begin and end tokens. Only
    /// for trying the pipeline: such a CLIP's embeddings mean nothing anyway.
    fn byte_tokens(&self, texts: &[&str]) -> Tensor {
        let tc = &self.model.config().text_config;
        let (ctx, vocab) = (tc.max_position_embeddings as usize, tc.vocab_size);
        // Legacy configs (eos id 2) pool at the largest id: make the end token the largest.
        let eos = if tc.eos_token_id == 2 {
            vocab - 1
        } else {
            tc.eos_token_id
        };
        let bos = vocab - 2;
        let mut ids = Vec::with_capacity(texts.len() * ctx);
        for t in texts {
            let mut row: Vec<i64> = vec![bos];
            row.extend(t.bytes().take(ctx - 2).map(|b| 3 + b as i64 % (vocab - 4)));
            row.push(eos);
            row.resize(ctx, tc.pad_token_id);
            ids.extend(row);
        }
        Tensor::from_slice(&ids).view([texts.len() as i64, ctx as i64])
    }
}
