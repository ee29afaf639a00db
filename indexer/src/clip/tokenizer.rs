//! CLIP text tokenisation through the `tokenizers` crate from a checkpoint's
//! `tokenizer.json`: the same library HF's `CLIPTokenizerFast` runs, padded and truncated to
//! the model's context length with begin/end tokens kept.

use crate::{IndexerError, Result};
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
    /// Loads `tokenizer.json`; pads with `pad_id` to `context_length` tokens. A file that
    /// does not load is an [`IndexerError::Checkpoint`] naming it.
    pub fn from_file(path: &Path, context_length: usize, pad_id: u32) -> Result<Self> {
        let bad = |e: tokenizers::Error| IndexerError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut inner = Tokenizer::from_file(path).map_err(bad)?;
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
            .map_err(bad)?;
        Ok(Self {
            inner,
            context_length,
        })
    }

    /// Tokens in the vocabulary (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids `[texts, context_length]` (i64) for the text tower.
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor> {
        let encodings =
            self.inner
                .encode_batch(texts.to_vec(), true)
                .map_err(|e| IndexerError::Tokenizer {
                    reason: e.to_string(),
                })?;
        let ids: Vec<i64> = encodings
            .iter()
            .flat_map(|e| e.get_ids().iter().map(|&i| i as i64))
            .collect();
        Ok(Tensor::from_slice(&ids).view([texts.len() as i64, self.context_length as i64]))
    }
}

/// The special tokens of a tokenizer [`train_bpe`] makes, with their ids (the first three).
pub const BOS_TOKEN: (&str, u32) = ("<|startoftext|>", 0);
/// End of text: the text tower pools at its first position.
pub const EOS_TOKEN: (&str, u32) = ("<|endoftext|>", 1);
/// Padding after the end token.
pub const PAD_TOKEN: (&str, u32) = ("<|pad|>", 2);

/// Trains a byte-level BPE tokenizer of `vocab_size` tokens on `texts` (lower-cased, NFC),
/// with [`BOS_TOKEN`], [`EOS_TOKEN`] and [`PAD_TOKEN`] first and every text wrapped in begin
/// and end tokens: the layout of OpenAI CLIP's tokenizer, learned from a user's captions.
/// Returns `tokenizer.json`'s text, which HF `tokenizers` and [`ClipTokenizer`] load.
pub fn train_bpe<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
) -> Result<String> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::normalizers::{Lowercase, Sequence, NFC};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;

    let fail = |reason: String| IndexerError::Tokenizer { reason };
    let specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN];
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|(t, _)| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_normalizer(Some(Sequence::new(vec![NFC.into(), Lowercase.into()])))
        .map_err(|e| fail(e.to_string()))?
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, texts)
        .map_err(|e| fail(e.to_string()))?;
    for (t, id) in specials {
        if tok.token_to_id(t) != Some(id) {
            return Err(fail(format!("special token {t} did not get id {id}")));
        }
    }
    let template = TemplateProcessing::builder()
        .try_single(format!("{}:0 $A:0 {}:0", BOS_TOKEN.0, EOS_TOKEN.0))
        .and_then(|b| {
            b.special_tokens(vec![
                (BOS_TOKEN.0.to_string(), BOS_TOKEN.1),
                (EOS_TOKEN.0.to_string(), EOS_TOKEN.1),
            ])
            .build()
            .map_err(|e| e.to_string())
        })
        .map_err(fail)?;
    tok.with_post_processor(Some(template));
    tok.to_string(true).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trained_tokenizer_wraps_and_pads() {
        let texts = [
            "red heart",
            "smiling cat face",
            "red apple",
            "cat with heart eyes",
        ];
        let corpus: Vec<&str> = texts.iter().cycle().take(200).copied().collect();
        let json = train_bpe(corpus.into_iter(), 300).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let tok = ClipTokenizer::from_file(&path, 8, PAD_TOKEN.1).unwrap();
        let ids = Vec::<i64>::try_from(tok.encode(&["Red Heart"]).unwrap().view([-1])).unwrap();
        assert_eq!(ids[0], BOS_TOKEN.1 as i64);
        let eos = ids.iter().position(|&i| i == EOS_TOKEN.1 as i64).unwrap();
        assert!((2..=4).contains(&eos), "{ids:?}");
        assert!(ids[eos + 1..].iter().all(|&i| i == PAD_TOKEN.1 as i64));
        // Truncation keeps the end token.
        let long = "red heart ".repeat(20);
        let ids = Vec::<i64>::try_from(tok.encode(&[long.as_str()]).unwrap().view([-1])).unwrap();
        assert_eq!(ids[7], EOS_TOKEN.1 as i64);
    }
}
