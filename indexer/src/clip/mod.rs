//! CLIP, the frozen multimodal encoder of KNN-Diffusion (PAPER.md, "The three components"):
//! `f_img` embeds training images, `f_txt` embeds prompts, both into one space. Everything a
//! CLIP user needs is here, below both the embed stage and the trainer:
//!
//! - [`config`]: the architecture, mirroring HF's `config.json`, with presets;
//! - [`model`]: the network (HF `CLIPModel` layer for layer);
//! - [`preprocess`]: the image pipeline of `CLIPImageProcessor`;
//! - [`tokenizer`]: the text tokenizer (`tokenizer.json`);
//! - [`checkpoint`]: reading an HF checkpoint directory (local or object-store URL);
//! - [`settings`]: `[embed.clip]`, device and precision, and the identity tables record;
//! - [`text`]: texts → normalised embeddings.
//!
//! CLIP stays a module of the indexer rather than a crate of its own: the embed stage is its
//! main user, `train-clip` (in the trainer) only needs the model and the tokenizer from here,
//! and a separate crate would add one more ~430 MB test binary to link for no new boundary.

pub mod checkpoint;
pub mod config;
pub mod model;
pub mod preprocess;
pub mod settings;
pub mod text;
pub mod tokenizer;

pub use checkpoint::{ClipCheckpoint, LoadedClip, ModalityMeans, MODALITY_FILE};
pub use config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use model::{l2_normalize, ClipModel};
pub use preprocess::ClipImageProcessor;
pub use settings::{ClipSettings, DeviceChoice, Precision, RandomPreset};
pub use tokenizer::ClipTokenizer;
