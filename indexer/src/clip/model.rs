//! CLIP (Radford et al. 2021, arXiv 2103.00020) in tch, layer for layer as HF `transformers`'
//! `modeling_clip.py` (`CLIPModel`), so that HF checkpoints load by name: every `vs / "name"`
//! below is the checkpoint key.

use super::config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
use tch::{nn, nn::Module, Kind, Tensor};

fn activation(act: Activation, xs: &Tensor) -> Tensor {
    match act {
        Activation::QuickGelu => xs * (xs * 1.702).sigmoid(),
        Activation::Gelu => xs.gelu("none"),
        Activation::GeluNew => xs.gelu("tanh"),
        Activation::Relu => xs.relu(),
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vs: nn::Path, hidden: i64, heads: i64) -> Self {
        let lin = |name: &str| nn::linear(&vs / name, hidden, hidden, Default::default());
        Self {
            q_proj: lin("q_proj"),
            k_proj: lin("k_proj"),
            v_proj: lin("v_proj"),
            out_proj: lin("out_proj"),
            heads,
            head_dim: hidden / heads,
        }
    }

    fn forward(&self, xs: &Tensor, causal: bool) -> Tensor {
        let (b, n, d) = xs
            .size3()
            .expect("attention input is [batch, tokens, hidden]");
        let split = |t: Tensor| t.view([b, n, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(self.q_proj.forward(xs));
        let k = split(self.k_proj.forward(xs));
        let v = split(self.v_proj.forward(xs));
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, causal, scale, false,
        );
        self.out_proj
            .forward(&out.transpose(1, 2).contiguous().view([b, n, d]))
    }
}

#[derive(Debug)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    layer_norm2: nn::LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn new(vs: nn::Path, hidden: i64, inter: i64, heads: i64, eps: f64, act: Activation) -> Self {
        let ln = nn::LayerNormConfig {
            eps,
            ..Default::default()
        };
        Self {
            self_attn: Attention::new(&vs / "self_attn", hidden, heads),
            layer_norm1: nn::layer_norm(&vs / "layer_norm1", vec![hidden], ln),
            fc1: nn::linear(&vs / "mlp" / "fc1", hidden, inter, Default::default()),
            fc2: nn::linear(&vs / "mlp" / "fc2", inter, hidden, Default::default()),
            layer_norm2: nn::layer_norm(&vs / "layer_norm2", vec![hidden], ln),
            act,
        }
    }

    fn forward(&self, xs: &Tensor, causal: bool) -> Tensor {
        let xs = xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs), causal);
        let h = activation(self.act, &self.fc1.forward(&self.layer_norm2.forward(&xs)));
        xs + self.fc2.forward(&h)
    }
}

#[derive(Debug)]
struct Encoder {
    layers: Vec<EncoderLayer>,
}

/// The transformer shape both towers share.
struct EncoderShape {
    layers: i64,
    hidden: i64,
    inter: i64,
    heads: i64,
    eps: f64,
    act: Activation,
}

impl From<&ClipTextConfig> for EncoderShape {
    fn from(c: &ClipTextConfig) -> Self {
        Self {
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        }
    }
}

impl From<&ClipVisionConfig> for EncoderShape {
    fn from(c: &ClipVisionConfig) -> Self {
        Self {
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        }
    }
}

impl Encoder {
    fn new(vs: nn::Path, s: EncoderShape) -> Self {
        let vs = &vs / "layers";
        Self {
            layers: (0..s.layers)
                .map(|i| EncoderLayer::new(&vs / i, s.hidden, s.inter, s.heads, s.eps, s.act))
                .collect(),
        }
    }

    fn forward(&self, xs: &Tensor, causal: bool) -> Tensor {
        self.layers
            .iter()
            .fold(xs.shallow_clone(), |xs, l| l.forward(&xs, causal))
    }
}

/// The text tower (`text_model`): token + position embeddings, causal transformer,
/// final LayerNorm, pooled at the first end-of-text token.
#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    encoder: Encoder,
    final_layer_norm: nn::LayerNorm,
    eos_token_id: i64,
}

impl ClipTextTransformer {
    /// Builds the tower under `vs` (= `text_model`).
    pub fn new(vs: nn::Path, c: &ClipTextConfig) -> Self {
        let emb = &vs / "embeddings";
        Self {
            token_embedding: nn::embedding(
                &emb / "token_embedding",
                c.vocab_size,
                c.hidden_size,
                Default::default(),
            ),
            position_embedding: nn::embedding(
                &emb / "position_embedding",
                c.max_position_embeddings,
                c.hidden_size,
                Default::default(),
            ),
            encoder: Encoder::new(&vs / "encoder", EncoderShape::from(c)),
            final_layer_norm: nn::layer_norm(
                &vs / "final_layer_norm",
                vec![c.hidden_size],
                nn::LayerNormConfig {
                    eps: c.layer_norm_eps,
                    ..Default::default()
                },
            ),
            eos_token_id: c.eos_token_id,
        }
    }

    /// Pooled output `[batch, hidden]` for `input_ids` `[batch, tokens]` (i64).
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let (b, n) = input_ids.size2().expect("input_ids is [batch, tokens]");
        let positions = Tensor::arange(n, (Kind::Int64, input_ids.device()));
        let xs = self.token_embedding.forward(input_ids)
            + self.position_embedding.forward(&positions).unsqueeze(0);
        let xs = self
            .final_layer_norm
            .forward(&self.encoder.forward(&xs, true));
        // HF: legacy configs (eos id 2) pool at the largest id, others at the first eos.
        let eos_pos = if self.eos_token_id == 2 {
            input_ids.argmax(-1, false)
        } else {
            input_ids
                .eq(self.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let rows = Tensor::arange(b, (Kind::Int64, input_ids.device()));
        xs.index(&[Some(rows), Some(eos_pos)])
    }
}

/// The image tower (`vision_model`): patch + class + position embeddings, pre-LayerNorm,
/// transformer, post-LayerNorm of the class token.
#[derive(Debug)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    encoder: Encoder,
    post_layernorm: nn::LayerNorm,
}

impl ClipVisionTransformer {
    /// Builds the tower under `vs` (= `vision_model`).
    pub fn new(vs: nn::Path, c: &ClipVisionConfig) -> Self {
        let emb = &vs / "embeddings";
        let grid = c.image_size / c.patch_size;
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        Self {
            class_embedding: emb.var(
                "class_embedding",
                &[c.hidden_size],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            patch_embedding: nn::conv2d(
                &emb / "patch_embedding",
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                nn::ConvConfig {
                    stride: c.patch_size,
                    bias: false,
                    ..Default::default()
                },
            ),
            position_embedding: nn::embedding(
                &emb / "position_embedding",
                grid * grid + 1,
                c.hidden_size,
                Default::default(),
            ),
            pre_layrnorm: nn::layer_norm(&vs / "pre_layrnorm", vec![c.hidden_size], ln),
            encoder: Encoder::new(&vs / "encoder", EncoderShape::from(c)),
            post_layernorm: nn::layer_norm(&vs / "post_layernorm", vec![c.hidden_size], ln),
        }
    }

    /// Pooled output `[batch, hidden]` for `pixel_values` `[batch, 3, size, size]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let kind = self.class_embedding.kind();
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_kind(kind))
            .flatten(2, -1)
            .transpose(1, 2);
        let b = patches.size()[0];
        let d = self.class_embedding.size()[0];
        let cls = self
            .class_embedding
            .view([1, 1, d])
            .expand([b, 1, d], false);
        let xs = Tensor::cat(&[cls, patches], 1);
        let n = xs.size()[1];
        let positions = Tensor::arange(n, (Kind::Int64, xs.device()));
        let xs = xs + self.position_embedding.forward(&positions).unsqueeze(0);
        let xs = self.encoder.forward(&self.pre_layrnorm.forward(&xs), false);
        self.post_layernorm.forward(&xs.select(1, 0))
    }
}

/// CLIP: both towers and their projections into the joint space.
#[derive(Debug)]
pub struct ClipModel {
    text_model: ClipTextTransformer,
    vision_model: ClipVisionTransformer,
    text_projection: nn::Linear,
    visual_projection: nn::Linear,
    logit_scale: Tensor,
    config: ClipConfig,
}

impl ClipModel {
    /// Builds the model under `vs` (the checkpoint root).
    pub fn new(vs: nn::Path, c: &ClipConfig) -> Self {
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        // ln(1 / 0.07), the temperature CLIP starts from (Radford et al. 2021, §2.5).
        let logit_scale = vs.var("logit_scale", &[], nn::Init::Const(2.6592));
        Self {
            text_model: ClipTextTransformer::new(&vs / "text_model", &c.text_config),
            vision_model: ClipVisionTransformer::new(&vs / "vision_model", &c.vision_config),
            text_projection: nn::linear(
                &vs / "text_projection",
                c.text_config.hidden_size,
                c.projection_dim,
                no_bias,
            ),
            visual_projection: nn::linear(
                &vs / "visual_projection",
                c.vision_config.hidden_size,
                c.projection_dim,
                no_bias,
            ),
            logit_scale,
            config: c.clone(),
        }
    }

    /// The learned log inverse temperature of the contrastive logits.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Image embeddings `[batch, projection_dim]` (not normalised), as HF
    /// `CLIPModel.get_image_features`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Tensor {
        self.visual_projection
            .forward(&self.vision_model.forward(pixel_values))
    }

    /// Text embeddings `[batch, projection_dim]` (not normalised), as HF
    /// `CLIPModel.get_text_features`.
    pub fn text_features(&self, input_ids: &Tensor) -> Tensor {
        self.text_projection
            .forward(&self.text_model.forward(input_ids))
    }
}

/// L2-normalises rows (cosine similarity becomes a dot product).
pub fn l2_normalize(xs: &Tensor) -> Tensor {
    xs / xs.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12)
}
