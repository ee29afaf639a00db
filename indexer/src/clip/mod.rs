//! CLIP, the frozen multimodal encoder of KNN-Diffusion (PAPER.md, "The three components"):
//! `f_img` embeds training images, `f_txt` embeds prompts, both into one space.
//!
//! [`model`] is the network (HF `CLIPModel` layer for layer), [`preprocess`] the image
//! pipeline of `CLIPImageProcessor`, [`tokenizer`] the text side, and [`checkpoint`] reads an
//! HF checkpoint directory (local or object-store URL) into them.

pub mod checkpoint;
pub mod config;
pub mod model;
pub mod preprocess;
pub mod tokenizer;

pub use checkpoint::{ClipCheckpoint, LoadedClip};
pub use config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use model::{l2_normalize, ClipModel};
pub use preprocess::ClipImageProcessor;
pub use tokenizer::ClipTokenizer;
