//! CLIP configuration mirroring HF `transformers`' `CLIPConfig` (`config.json`), with the
//! same defaults, and named presets.

use serde::{Deserialize, Serialize};

/// Activation function of the MLP blocks (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    /// ReLU.
    Relu,
}

/// The text transformer (`text_config`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    pub vocab_size: i64,
    /// Width of the transformer.
    pub hidden_size: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Number of layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Context length in tokens.
    pub max_position_embeddings: i64,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// End-of-text token id; its first position is pooled (2 means the legacy argmax rule).
    pub eos_token_id: i64,
    /// Padding token id.
    pub pad_token_id: i64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
            pad_token_id: 1,
        }
    }
}

/// The vision transformer (`vision_config`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    pub hidden_size: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Number of layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Input channels.
    pub num_channels: i64,
    /// Input side in pixels.
    pub image_size: i64,
    /// Patch side in pixels.
    pub patch_size: i64,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// A whole CLIP model (`config.json`). Unknown keys of HF's file are ignored.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipConfig {
    /// Text tower.
    pub text_config: ClipTextConfig,
    /// Image tower.
    pub vision_config: ClipVisionConfig,
    /// Dimension of the joint embedding space.
    pub projection_dim: i64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self::vit_b_32()
    }
}

impl ClipConfig {
    /// OpenAI CLIP ViT-B/32 (`openai/clip-vit-base-patch32`): d = 512.
    pub fn vit_b_32() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
        }
    }

    /// OpenAI CLIP ViT-L/14 (`openai/clip-vit-large-patch14`): d = 768.
    pub fn vit_l_14() -> Self {
        Self {
            text_config: ClipTextConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_attention_heads: 12,
                ..Default::default()
            },
            vision_config: ClipVisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                patch_size: 14,
                ..Default::default()
            },
            projection_dim: 768,
        }
    }

    /// A tiny random-weight CLIP for tests and the embedded default (d = 64, 32 px input).
    pub fn tiny() -> Self {
        Self {
            text_config: ClipTextConfig {
                vocab_size: 1000,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 32,
                eos_token_id: 2,
                ..Default::default()
            },
            vision_config: ClipVisionConfig {
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                image_size: 32,
                patch_size: 8,
                ..Default::default()
            },
            projection_dim: 64,
        }
    }
}
