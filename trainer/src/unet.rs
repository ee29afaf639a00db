//! The denoising *network*: an ADM U-Net (Dhariwal & Nichol 2021, arXiv 2105.05233;
//! github.com/openai/guided-diffusion `unet.py`) conditioned the DALL-E 2 decoder way
//! (Ramesh et al. 2022, arXiv 2204.06125, §2.1; GLIDE's `text2im_model.py`): each
//! conditioning embedding becomes one context token that the attention blocks attend to
//! alongside the image tokens, and the tokens' pooled projection is added to the timestep
//! embedding.
//!
//! KNN-Diffusion (PAPER.md) conditions on the query CLIP embedding and its k neighbours'
//! embeddings: k + 1 tokens, slot 0 the query. A learned null token per slot stands in for
//! a dropped condition (classifier-free guidance) and for a neighbour the table lacks.
//! `knn = 0` is the paper's no-kNN ablation: one token, same code.
//!
//! The `vs / "name"` paths follow guided-diffusion's state-dict keys (`input_blocks.1.0`,
//! `middle_block`, `out.2`, …) so a checkpoint reads like one.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Shape of the U-Net. Presets: [`UNetConfig::preset`].
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Side of the (square) training images in pixels.
    pub image_size_px: usize,
    /// Image channels (RGB: 3).
    pub in_channels: usize,
    /// Channels of the first level; level i has `model_channels * channel_mult[i]`.
    pub model_channels: usize,
    /// Channel multiplier per resolution level (each level after the first halves the side).
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (one more on the way up).
    pub num_res_blocks: usize,
    /// Sides in pixels at which blocks get attention (e.g. `[16, 8]` for 64 px images).
    pub attention_resolutions_px: Vec<usize>,
    /// Channels per attention head.
    pub head_channels: usize,
    /// Groups of every GroupNorm.
    pub norm_groups: usize,
    /// Dropout in residual blocks.
    pub dropout: f64,
    /// Dimension of the conditioning CLIP embeddings.
    pub cond_dim: usize,
    /// Neighbours k conditioning each sample (0: the no-kNN ablation).
    pub knn: usize,
    /// Width of the context tokens.
    pub context_channels: usize,
}

/// Named U-Net sizes.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UNetPreset {
    /// ~1.2M parameters: CPU tests and the embedded demo.
    #[default]
    Tiny,
    /// ~8M parameters.
    Small,
    /// ~100M parameters (ADM-like).
    Base,
    /// ~400M parameters with 512-d CLIP: the paper's size.
    #[serde(rename = "paper-400m")]
    Paper400m,
}

impl UNetConfig {
    /// A preset for images of `image_size_px` conditioned on `knn` neighbours of `cond_dim`.
    pub fn preset(p: UNetPreset, image_size_px: usize, cond_dim: usize, knn: usize) -> Self {
        let s = image_size_px;
        let (mc, mult, res, attn, head, groups, ctx): (
            usize,
            Vec<usize>,
            usize,
            Vec<usize>,
            usize,
            usize,
            usize,
        ) = match p {
            UNetPreset::Tiny => (32, vec![1, 2, 2], 1, vec![s / 4], 32, 8, 64),
            UNetPreset::Small => (64, vec![1, 2, 2], 2, vec![s / 2, s / 4], 32, 32, 256),
            UNetPreset::Base => (
                128,
                vec![1, 2, 3, 4],
                2,
                vec![s / 2, s / 4, s / 8],
                64,
                32,
                512,
            ),
            UNetPreset::Paper400m => (
                224,
                vec![1, 2, 3, 4],
                3,
                vec![s / 2, s / 4, s / 8],
                32,
                32,
                1024,
            ),
        };
        Self {
            image_size_px,
            in_channels: 3,
            model_channels: mc,
            channel_mult: mult,
            num_res_blocks: res,
            attention_resolutions_px: attn,
            head_channels: head,
            norm_groups: groups,
            dropout: 0.0,
            cond_dim,
            knn,
            context_channels: ctx,
        }
    }

    /// Context tokens per sample: the query plus its neighbours.
    pub fn tokens(&self) -> usize {
        self.knn + 1
    }

    /// Checks the shape; `key` prefixes config keys in errors.
    pub fn validate(&self, key: &str) -> crate::Result<()> {
        let err = |field: &str, reason: String| {
            Err(crate::TrainerError::config(
                &format!("{key}.{field}"),
                reason,
            ))
        };
        let levels = self.channel_mult.len();
        if levels == 0 || self.channel_mult.contains(&0) {
            return err(
                "channel_mult",
                "needs at least one level, each multiplier >= 1".into(),
            );
        }
        let factor = 1usize << (levels - 1);
        if self.image_size_px == 0 || !self.image_size_px.is_multiple_of(factor) {
            return err(
                "image_size_px",
                format!(
                    "{} px is not divisible by {factor}, the U-Net's downsampling over {levels} levels \
                     (channel_mult {:?}); use a size divisible by {factor} or fewer levels",
                    self.image_size_px, self.channel_mult
                ),
            );
        }
        for &m in &self.channel_mult {
            let ch = self.model_channels * m;
            if !ch.is_multiple_of(self.norm_groups) {
                return err(
                    "norm_groups",
                    format!(
                        "{ch} channels (model_channels x {m}) are not divisible into {} groups",
                        self.norm_groups
                    ),
                );
            }
        }
        let sides: Vec<usize> = (0..levels).map(|l| self.image_size_px >> l).collect();
        // The middle block always attends, at the deepest level's width.
        let deepest = self.model_channels * self.channel_mult[levels - 1];
        if self.head_channels == 0 || !deepest.is_multiple_of(self.head_channels) {
            return err(
                "head_channels",
                format!(
                    "the middle block's {deepest} channels are not divisible into heads of {}",
                    self.head_channels
                ),
            );
        }
        for r in &self.attention_resolutions_px {
            if !sides.contains(r) {
                return err(
                    "attention_resolutions_px",
                    format!("{r} px is not one of the U-Net's resolutions {sides:?}"),
                );
            }
            let level = sides.iter().position(|s| s == r).unwrap_or(0);
            let ch = self.model_channels * self.channel_mult[level];
            if self.head_channels == 0 || !ch.is_multiple_of(self.head_channels) {
                return err(
                    "head_channels",
                    format!(
                        "{ch} channels at {r} px are not divisible into heads of {}",
                        self.head_channels
                    ),
                );
            }
        }
        if self.cond_dim == 0 {
            return err(
                "cond_dim",
                "must be the CLIP embedding dimension (> 0)".into(),
            );
        }
        Ok(())
    }

    fn time_channels(&self) -> i64 {
        4 * self.model_channels as i64
    }
}

/// ADM's sinusoidal timestep embedding (`timestep_embedding` in guided-diffusion `nn.py`).
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], 1)
}

fn zero_conv(vs: nn::Path, cin: i64, cout: i64, k: i64) -> nn::Conv2D {
    nn::conv2d(
        vs,
        cin,
        cout,
        k,
        nn::ConvConfig {
            padding: k / 2,
            ws_init: nn::Init::Const(0.0),
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        },
    )
}

fn conv3(vs: nn::Path, cin: i64, cout: i64) -> nn::Conv2D {
    nn::conv2d(
        vs,
        cin,
        cout,
        3,
        nn::ConvConfig {
            padding: 1,
            ..Default::default()
        },
    )
}

fn norm(vs: nn::Path, groups: i64, ch: i64) -> nn::GroupNorm {
    nn::group_norm(vs, groups, ch, Default::default())
}

/// Residual block with scale-shift timestep conditioning (ADM `ResBlock`,
/// `use_scale_shift_norm=True`): h = conv(SiLU(GN(h)·(1+s)+b)).
#[derive(Debug)]
struct ResBlock {
    in_norm: nn::GroupNorm,
    in_conv: nn::Conv2D,
    emb: nn::Linear,
    out_norm: nn::GroupNorm,
    out_conv: nn::Conv2D,
    skip: Option<nn::Conv2D>,
    dropout: f64,
}

impl ResBlock {
    fn new(vs: nn::Path, cin: i64, cout: i64, temb: i64, cfg: &UNetConfig) -> Self {
        let g = cfg.norm_groups as i64;
        Self {
            in_norm: norm(&vs / "in_layers" / 0, g, cin),
            in_conv: conv3(&vs / "in_layers" / 2, cin, cout),
            emb: nn::linear(&vs / "emb_layers" / 1, temb, 2 * cout, Default::default()),
            out_norm: norm(&vs / "out_layers" / 0, g, cout),
            out_conv: zero_conv(&vs / "out_layers" / 3, cout, cout, 3),
            skip: (cin != cout)
                .then(|| nn::conv2d(&vs / "skip_connection", cin, cout, 1, Default::default())),
            dropout: cfg.dropout,
        }
    }

    fn forward(&self, x: &Tensor, emb: &Tensor, train: bool) -> Tensor {
        let h = self.in_conv.forward(&self.in_norm.forward(x).silu());
        let ss = self.emb.forward(&emb.silu()).unsqueeze(-1).unsqueeze(-1);
        let parts = ss.chunk(2, 1);
        let h = self.out_norm.forward(&h) * (parts[0].ones_like() + &parts[0]) + &parts[1];
        let h = self
            .out_conv
            .forward(&h.silu().dropout(self.dropout, train));
        match &self.skip {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// Multi-head attention over the image tokens and the context tokens together (GLIDE's
/// `AttentionBlock` with `encoder_channels`): keys and values are the context tokens'
/// projections followed by the image tokens'.
#[derive(Debug)]
struct AttentionBlock {
    norm: nn::GroupNorm,
    qkv: nn::Linear,
    encoder_kv: nn::Linear,
    proj_out: nn::Linear,
    heads: i64,
}

impl AttentionBlock {
    fn new(vs: nn::Path, ch: i64, cfg: &UNetConfig) -> Self {
        Self {
            norm: norm(&vs / "norm", cfg.norm_groups as i64, ch),
            qkv: nn::linear(&vs / "qkv", ch, 3 * ch, Default::default()),
            encoder_kv: nn::linear(
                &vs / "encoder_kv",
                cfg.context_channels as i64,
                2 * ch,
                Default::default(),
            ),
            proj_out: nn::linear(
                &vs / "proj_out",
                ch,
                ch,
                nn::LinearConfig {
                    ws_init: nn::Init::Const(0.0),
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                },
            ),
            heads: ch / cfg.head_channels as i64,
        }
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("attention input is [B, C, H, W]");
        let tokens = self.norm.forward(x).view([b, c, h * w]).transpose(1, 2);
        let heads = |t: &Tensor| {
            let n = t.size()[1];
            t.view([b, n, self.heads, c / self.heads]).transpose(1, 2)
        };
        let qkv = self.qkv.forward(&tokens).chunk(3, 2);
        let ekv = self.encoder_kv.forward(context).chunk(2, 2);
        let q = heads(&qkv[0]);
        let k = heads(&Tensor::cat(&[&ekv[0], &qkv[1]], 1));
        let v = heads(&Tensor::cat(&[&ekv[1], &qkv[2]], 1));
        let a = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, false, None, false,
        );
        let a = a.transpose(1, 2).reshape([b, h * w, c]);
        x + self.proj_out.forward(&a).transpose(1, 2).view([b, c, h, w])
    }
}

/// One entry of a U-Net stage.
#[derive(Debug)]
enum Layer {
    Conv(nn::Conv2D),
    Res(Box<ResBlock>),
    Attn(Box<AttentionBlock>),
    Down(nn::Conv2D),
    Up(nn::Conv2D),
}

impl Layer {
    fn forward(&self, x: &Tensor, emb: &Tensor, ctx: &Tensor, train: bool) -> Tensor {
        match self {
            Layer::Conv(c) | Layer::Down(c) => c.forward(x),
            Layer::Res(r) => r.forward(x, emb, train),
            Layer::Attn(a) => a.forward(x, ctx),
            Layer::Up(c) => {
                let (_, _, h, w) = x.size4().expect("upsample input is [B, C, H, W]");
                c.forward(&x.upsample_nearest2d([2 * h, 2 * w], None, None))
            }
        }
    }
}

fn run(stage: &[Layer], x: Tensor, emb: &Tensor, ctx: &Tensor, train: bool) -> Tensor {
    stage.iter().fold(x, |h, l| l.forward(&h, emb, ctx, train))
}

/// The condition of one batch: CLIP embeddings of each query and its neighbours.
#[derive(Debug)]
pub struct Condition {
    /// `[B, k + 1, d]`: slot 0 the query, then the neighbours best first.
    pub emb: Tensor,
    /// `[B, k + 1]` float: 1 where the slot has an embedding, 0 where the neighbour is
    /// missing (its slot gets the null token).
    pub present: Tensor,
    /// `[B]` float: 1 to drop the whole condition (all null tokens: the unconditional branch).
    pub drop: Tensor,
}

impl Condition {
    /// The same condition with every sample's condition dropped.
    pub fn unconditional(&self) -> Self {
        Self {
            emb: self.emb.shallow_clone(),
            present: self.present.shallow_clone(),
            drop: self.drop.ones_like(),
        }
    }

    /// Two conditions stacked along the batch (one forward pass for guidance).
    pub fn cat(a: &Self, b: &Self) -> Self {
        Self {
            emb: Tensor::cat(&[&a.emb, &b.emb], 0),
            present: Tensor::cat(&[&a.present, &b.present], 0),
            drop: Tensor::cat(&[&a.drop, &b.drop], 0),
        }
    }
}

/// Embeddings → context tokens, with learned null tokens and a pooled projection.
#[derive(Debug)]
struct ConditionEncoder {
    query: nn::Linear,
    neighbours: nn::Linear,
    slot: Tensor,
    null: Tensor,
    norm: nn::LayerNorm,
    pool: nn::Linear,
}

impl ConditionEncoder {
    fn new(vs: nn::Path, cfg: &UNetConfig, temb: i64) -> Self {
        let (d, c, n) = (
            cfg.cond_dim as i64,
            cfg.context_channels as i64,
            cfg.tokens() as i64,
        );
        Self {
            query: nn::linear(&vs / "query_proj", d, c, Default::default()),
            neighbours: nn::linear(&vs / "knn_proj", d, c, Default::default()),
            slot: vs.var(
                "slot_embedding",
                &[n, c],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            null: vs.var(
                "null_tokens",
                &[n, c],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            norm: nn::layer_norm(&vs / "norm", vec![c], Default::default()),
            pool: nn::linear(&vs / "pool_proj", c, temb, Default::default()),
        }
    }

    /// Context tokens `[B, k+1, C]` and the pooled embedding `[B, temb]`.
    fn forward(&self, cond: &Condition) -> (Tensor, Tensor) {
        let (b, n, _) = cond.emb.size3().expect("condition emb is [B, k+1, d]");
        let q = self.query.forward(&cond.emb.narrow(1, 0, 1));
        let tokens = if n > 1 {
            Tensor::cat(
                &[q, self.neighbours.forward(&cond.emb.narrow(1, 1, n - 1))],
                1,
            )
        } else {
            q
        };
        let tokens = self.norm.forward(&(tokens + self.slot.unsqueeze(0)));
        let keep = (&cond.present * (cond.drop.ones_like() - &cond.drop).unsqueeze(1))
            .unsqueeze(-1)
            .to_kind(tokens.kind());
        let null = self.null.unsqueeze(0).expand([b, n, -1], false);
        let tokens = &tokens * &keep + null * (keep.ones_like() - &keep);
        let pooled = self.pool.forward(&tokens.mean_dim(1, false, tokens.kind()));
        (tokens, pooled)
    }
}

/// The U-Net.
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    time_embed: (nn::Linear, nn::Linear),
    cond: ConditionEncoder,
    input_blocks: Vec<Vec<Layer>>,
    middle_block: Vec<Layer>,
    output_blocks: Vec<Vec<Layer>>,
    out_norm: nn::GroupNorm,
    out_conv: nn::Conv2D,
}

impl UNet {
    /// Builds the network's variables under `vs`. The config must have passed
    /// [`UNetConfig::validate`].
    pub fn new(vs: nn::Path, cfg: &UNetConfig) -> Self {
        let mc = cfg.model_channels as i64;
        let temb = cfg.time_channels();
        let time_embed = (
            nn::linear(&vs / "time_embed" / 0, mc, temb, Default::default()),
            nn::linear(&vs / "time_embed" / 2, temb, temb, Default::default()),
        );
        let cond = ConditionEncoder::new(&vs / "cond", cfg, temb);
        let levels = cfg.channel_mult.len();
        let attn_at = |level: usize| {
            cfg.attention_resolutions_px
                .contains(&(cfg.image_size_px >> level))
        };

        let ib = &vs / "input_blocks";
        let mut input_blocks = vec![vec![Layer::Conv(conv3(
            &ib / 0 / 0,
            cfg.in_channels as i64,
            mc,
        ))]];
        let mut skips = vec![mc];
        let mut ch = mc;
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let p = &ib / input_blocks.len();
                let out = mc * mult as i64;
                let mut block = vec![Layer::Res(Box::new(ResBlock::new(
                    &p / 0,
                    ch,
                    out,
                    temb,
                    cfg,
                )))];
                ch = out;
                if attn_at(level) {
                    block.push(Layer::Attn(Box::new(AttentionBlock::new(&p / 1, ch, cfg))));
                }
                input_blocks.push(block);
                skips.push(ch);
            }
            if level + 1 < levels {
                let p = &ib / input_blocks.len() / 0 / "op";
                input_blocks.push(vec![Layer::Down(nn::conv2d(
                    p,
                    ch,
                    ch,
                    3,
                    nn::ConvConfig {
                        stride: 2,
                        padding: 1,
                        ..Default::default()
                    },
                ))]);
                skips.push(ch);
            }
        }

        let mb = &vs / "middle_block";
        let middle_block = vec![
            Layer::Res(Box::new(ResBlock::new(&mb / 0, ch, ch, temb, cfg))),
            Layer::Attn(Box::new(AttentionBlock::new(&mb / 1, ch, cfg))),
            Layer::Res(Box::new(ResBlock::new(&mb / 2, ch, ch, temb, cfg))),
        ];

        let ob = &vs / "output_blocks";
        let mut output_blocks = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let p = &ob / output_blocks.len();
                let skip = skips.pop().expect("one skip per input block");
                let out = mc * mult as i64;
                let mut block = vec![Layer::Res(Box::new(ResBlock::new(
                    &p / 0,
                    ch + skip,
                    out,
                    temb,
                    cfg,
                )))];
                ch = out;
                if attn_at(level) {
                    block.push(Layer::Attn(Box::new(AttentionBlock::new(&p / 1, ch, cfg))));
                }
                if level > 0 && i == cfg.num_res_blocks {
                    let at = block.len();
                    block.push(Layer::Up(conv3(&p / at / "conv", ch, ch)));
                }
                output_blocks.push(block);
            }
        }
        Self {
            config: cfg.clone(),
            time_embed,
            cond,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: norm(&vs / "out" / 0, cfg.norm_groups as i64, ch),
            out_conv: zero_conv(&vs / "out" / 2, ch, cfg.in_channels as i64, 3),
        }
    }

    /// Its shape.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The model output (ε or v) for noisy images `x` `[B, C, H, W]` at steps `t` `[B]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, cond: &Condition, train: bool) -> Tensor {
        let temb = timestep_embedding(t, self.config.model_channels as i64).to_kind(x.kind());
        let emb = self
            .time_embed
            .1
            .forward(&self.time_embed.0.forward(&temb).silu());
        let (ctx, pooled) = self.cond.forward(cond);
        let emb = emb + pooled;
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        let mut h = x.shallow_clone();
        for block in &self.input_blocks {
            h = run(block, h, &emb, &ctx, train);
            hs.push(h.shallow_clone());
        }
        h = run(&self.middle_block, h, &emb, &ctx, train);
        for block in &self.output_blocks {
            let skip = hs.pop().expect("one skip per output block");
            h = run(block, Tensor::cat(&[h, skip], 1), &emb, &ctx, train);
        }
        self.out_conv.forward(&self.out_norm.forward(&h).silu())
    }
}

/// Number of trainable scalars in a var store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainerError;
    use tch::Device;

    fn condition(b: i64, cfg: &UNetConfig) -> Condition {
        let n = cfg.tokens() as i64;
        Condition {
            emb: Tensor::randn([b, n, cfg.cond_dim as i64], (Kind::Float, Device::Cpu)),
            present: Tensor::ones([b, n], (Kind::Float, Device::Cpu)),
            drop: Tensor::zeros([b], (Kind::Float, Device::Cpu)),
        }
    }

    #[test]
    fn output_has_the_input_shape_for_every_preset_shape() {
        for (k, size) in [(0usize, 16usize), (3, 16), (2, 32)] {
            let cfg = UNetConfig::preset(UNetPreset::Tiny, size, 8, k);
            cfg.validate("m").unwrap();
            let vs = nn::VarStore::new(Device::Cpu);
            let net = UNet::new(vs.root(), &cfg);
            let x = Tensor::randn([2, 3, size as i64, size as i64], (Kind::Float, Device::Cpu));
            let y = net.forward(
                &x,
                &Tensor::from_slice(&[0i64, 999]),
                &condition(2, &cfg),
                false,
            );
            assert_eq!(y.size(), x.size());
        }
    }

    #[test]
    fn dropped_conditions_ignore_the_embeddings() {
        let cfg = UNetConfig::preset(UNetPreset::Tiny, 16, 8, 2);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), &cfg);
        // Zero-initialised output layers would hide everything: perturb every variable.
        tch::no_grad(|| {
            for mut v in vs.trainable_variables() {
                let _ = v.g_add_(&(v.randn_like() * 0.05));
            }
        });
        let x = Tensor::randn([1, 3, 16, 16], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[10i64]);
        let a = condition(1, &cfg);
        let b = condition(1, &cfg);
        let ya = net.forward(&x, &t, &a, false);
        let yb = net.forward(&x, &t, &b, false);
        assert!(f64::try_from((&ya - &yb).abs().max()).unwrap() > 1e-6);
        let ua = net.forward(&x, &t, &a.unconditional(), false);
        let ub = net.forward(&x, &t, &b.unconditional(), false);
        assert!(f64::try_from((&ua - &ub).abs().max()).unwrap() < 1e-7);
    }

    #[test]
    fn bad_shapes_name_the_key() {
        let mut cfg = UNetConfig::preset(UNetPreset::Small, 62, 8, 2);
        let e = cfg.validate("train.model").unwrap_err();
        assert!(
            matches!(&e, TrainerError::Config { key, reason }
                if key == "train.model.image_size_px" && reason.contains("divisible by 4")),
            "{e}"
        );
        cfg.image_size_px = 64;
        cfg.attention_resolutions_px = vec![7];
        let e = cfg.validate("train.model").unwrap_err();
        assert!(
            matches!(&e, TrainerError::Config { key, .. }
                if key == "train.model.attention_resolutions_px"),
            "{e}"
        );
    }
}
