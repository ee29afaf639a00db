#!/usr/bin/env python3
"""PyTorch-eager peer of the Rust training-step benchmark (`knn-diffusion bench train`).

What it is
    The reference ("peer") measurement for the Rust trainer (tch / libtorch). It
    rebuilds, module for module, the U-Net of ``trainer/src/unet.rs`` in plain
    ``torch.nn`` (same layer order, shapes, parameter names, parameter count and
    ops) and times the same training step as ``train()`` in
    ``trainer/src/train.rs``, so the two numbers differ only by the framework
    around libtorch, not by the work done.

    Mirrored pieces (Rust source -> here):
      - ``UNetConfig::preset``            -> ``unet_config`` (tiny/small/base/paper-400m)
      - ``timestep_embedding``            -> ``timestep_embedding``
      - ``ResBlock`` (scale-shift norm)   -> ``ResBlock``
      - ``AttentionBlock`` (GLIDE-style)  -> ``AttentionBlock``: qkv Linear over the
        image tokens, encoder_kv Linear over the context tokens prepended to the
        keys/values, ``F.scaled_dot_product_attention``, zero-initialised proj_out
      - ``Layer::Down`` / ``Layer::Up``   -> ``Downsample`` (stride-2 3x3 conv) /
        ``Upsample`` (nearest x2 then 3x3 conv)
      - ``ConditionEncoder``              -> ``ConditionEncoder`` (query_proj, knn_proj,
        slot_embedding, null_tokens, LayerNorm, keep-mask mixing, pool_proj)
      - ``UNet::new`` / ``UNet::forward`` -> ``UNet``
      - ``cosine_betas`` / ``q_sample`` / ``losses`` (diffusion.rs) -> ``cosine_betas``,
        ``q_sample``, ``losses`` (epsilon prediction, the default)
      - ``clip_grad_norm`` / ``AdamW`` / ``Ema`` (optim.rs) ->
        ``torch.nn.utils.clip_grad_norm_``, ``torch.optim.AdamW``, a per-tensor
        ``lerp_`` EMA with the same decay warm-up.
    ``state_dict()`` keys follow the Rust var-store paths (``input_blocks.1.0.in_layers.0.weight``,
    ``cond.null_tokens``, ``out.2.bias``, ...).

What it measures
    Random inputs are built once, before timing: images uniform in [-1, 1]
    ``[B, 3, S, S]``, condition embeddings ``[B, k+1, d]`` (randn), ``present``
    all ones, ``drop`` all zeros, ``t`` random ints in [0, 1000), noise randn,
    per-sample weight ones. Then ``--warmup`` untimed and ``--steps`` timed full
    training steps, each:
      zero the gradients in place (as the Rust loop does) -> seed the model RNG ->
      [autocast if enabled: q_sample -> U-Net forward -> per-sample MSE ->
      weighted mean] -> backward -> loss.item() -> clip_grad_norm_(1.0) ->
      AdamW step (lr 1e-4, weight decay 0) -> EMA update (decay 0.9999 with the
      min(decay, (1+n)/(10+n)) warm-up, one lerp_ per tensor).
    On CUDA every timed step ends with ``torch.cuda.synchronize()``.

Precision
    ``--precision auto`` (the Rust ``train.precision`` default) is f32 on the CPU
    and bf16 autocast on CUDA (the Rust trainer sets libtorch's CUDA autocast
    dtype to bf16 itself, trainer/src/autocast.rs); ``auto`` means the same here.
    ``--precision bf16`` / ``f16`` / ``f32`` pick one explicitly.

Output
    One JSON object printed on stdout and written to ``--out`` when given. Keys:
    preset, image_size, batch, k, dim, parameters, step_time_s_median,
    step_time_s_mean, steps, threads, torch_version, plus warmup, device,
    precision, foreach, step_times_s, last_loss.

Examples
    python python/bench_train_torch.py --preset tiny --image-size 64 --batch 16 \
        --k 10 --dim 64 --steps 20 --warmup 3 --threads 2 --out torch-train.json
    python python/bench_train_torch.py --preset paper-400m --k 10 --dim 512 --count-only
"""

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

TIMESTEPS = 1000
LR = 1e-4
GRAD_CLIP = 1.0
EMA_DECAY = 0.9999


def note(msg):
    print("bench_train_torch: " + msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Configuration: `UNetConfig::preset` in unet.rs.
# --------------------------------------------------------------------------------------


def unet_config(preset, image_size_px, cond_dim, knn):
    """The numbers of `UNetConfig::preset` (unet.rs), copied exactly."""
    s = image_size_px
    table = {
        # (model_channels, channel_mult, num_res_blocks, attention_resolutions_px,
        #  head_channels, norm_groups, context_channels)
        "tiny": (32, [1, 2, 2], 1, [s // 4], 32, 8, 64),
        "small": (64, [1, 2, 2], 2, [s // 2, s // 4], 32, 32, 256),
        "base": (128, [1, 2, 3, 4], 2, [s // 2, s // 4, s // 8], 64, 32, 512),
        "paper-400m": (224, [1, 2, 3, 4], 3, [s // 2, s // 4, s // 8], 32, 32, 1024),
    }
    mc, mult, res, attn, head, groups, ctx = table[preset]
    return dict(
        image_size_px=image_size_px,
        in_channels=3,
        model_channels=mc,
        channel_mult=mult,
        num_res_blocks=res,
        attention_resolutions_px=attn,
        head_channels=head,
        norm_groups=groups,
        dropout=0.0,
        cond_dim=cond_dim,
        knn=knn,
        context_channels=ctx,
    )


def validate(cfg):
    """The checks of `UNetConfig::validate` that matter for building the net."""
    levels = len(cfg["channel_mult"])
    factor = 1 << (levels - 1)
    if cfg["image_size_px"] % factor:
        sys.exit(f"bench_train_torch: image size {cfg['image_size_px']} is not divisible by {factor}")
    sides = [cfg["image_size_px"] >> l for l in range(levels)]
    for r in cfg["attention_resolutions_px"]:
        if r not in sides:
            sys.exit(f"bench_train_torch: attention resolution {r} px is not one of {sides}")


# --------------------------------------------------------------------------------------
# The network: unet.rs, module for module.
# --------------------------------------------------------------------------------------


def timestep_embedding(t, dim):
    """ADM's sinusoidal embedding, as `timestep_embedding` in unet.rs: [cos, sin]."""
    half = dim // 2
    freqs = (torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half)).exp()
    args = t.to(torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([args.cos(), args.sin()], 1)


def zero_conv(cin, cout, k):
    """`zero_conv`: weight and bias initialised to 0, 'same' padding."""
    c = nn.Conv2d(cin, cout, k, padding=k // 2)
    nn.init.zeros_(c.weight)
    nn.init.zeros_(c.bias)
    return c


def conv3(cin, cout):
    return nn.Conv2d(cin, cout, 3, padding=1)


def norm(groups, ch):
    # tch `nn::group_norm` default: eps 1e-5, affine.
    return nn.GroupNorm(groups, ch, eps=1e-5)


class ResBlock(nn.Module):
    """ADM ResBlock, use_scale_shift_norm: h = conv(SiLU(GN(h)*(1+s)+b)).

    Sub-module indices reproduce the Rust var paths (in_layers.0 / in_layers.2,
    emb_layers.1, out_layers.0 / out_layers.3, skip_connection); the forward
    calls them one by one in the Rust order, not as a Sequential."""

    def __init__(self, cin, cout, temb, cfg):
        super().__init__()
        g = cfg["norm_groups"]
        self.in_layers = nn.Sequential(norm(g, cin), nn.SiLU(), conv3(cin, cout))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(temb, 2 * cout))
        self.out_layers = nn.Sequential(
            norm(g, cout), nn.SiLU(), nn.Dropout(cfg["dropout"]), zero_conv(cout, cout, 3)
        )
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.dropout = cfg["dropout"]

    def forward(self, x, emb):
        h = self.in_layers[2](F.silu(self.in_layers[0](x)))
        ss = self.emb_layers[1](F.silu(emb)).unsqueeze(-1).unsqueeze(-1)
        scale, shift = ss.chunk(2, 1)
        h = self.out_layers[0](h) * (torch.ones_like(scale) + scale) + shift
        h = self.out_layers[3](F.dropout(F.silu(h), self.dropout, self.training))
        if self.skip_connection is not None:
            return self.skip_connection(x) + h
        return x + h


class AttentionBlock(nn.Module):
    """GLIDE AttentionBlock with encoder channels: keys/values are the context tokens'
    projections followed by the image tokens'."""

    def __init__(self, ch, cfg):
        super().__init__()
        self.norm = norm(cfg["norm_groups"], ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.encoder_kv = nn.Linear(cfg["context_channels"], 2 * ch)
        self.proj_out = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.heads = ch // cfg["head_channels"]

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.norm(x).view(b, c, h * w).transpose(1, 2)

        def heads(t):
            n = t.shape[1]
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k_img, v_img = self.qkv(tokens).chunk(3, 2)
        k_ctx, v_ctx = self.encoder_kv(context).chunk(2, 2)
        q = heads(q)
        k = heads(torch.cat([k_ctx, k_img], 1))
        v = heads(torch.cat([v_ctx, v_img], 1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        a = a.transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj_out(a).transpose(1, 2).view(b, c, h, w)


class Downsample(nn.Module):
    """`Layer::Down`: 3x3 stride-2 conv at `input_blocks.N.0.op`."""

    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """`Layer::Up`: nearest x2 upsample then 3x3 conv at `output_blocks.N.M.conv`."""

    def __init__(self, ch):
        super().__init__()
        self.conv = conv3(ch, ch)

    def forward(self, x):
        _, _, h, w = x.shape
        return self.conv(F.interpolate(x, size=(2 * h, 2 * w), mode="nearest"))


def run_layer(layer, h, emb, ctx):
    """`Layer::forward`: each kind takes the inputs it needs."""
    if isinstance(layer, ResBlock):
        return layer(h, emb)
    if isinstance(layer, AttentionBlock):
        return layer(h, ctx)
    return layer(h)  # Conv, Downsample, Upsample


def run_stage(stage, h, emb, ctx):
    for layer in stage:
        h = run_layer(layer, h, emb, ctx)
    return h


class ConditionEncoder(nn.Module):
    """Embeddings -> context tokens [B, k+1, C] and a pooled embedding [B, temb]."""

    def __init__(self, cfg, temb):
        super().__init__()
        d, c, n = cfg["cond_dim"], cfg["context_channels"], cfg["knn"] + 1
        self.query_proj = nn.Linear(d, c)
        self.knn_proj = nn.Linear(d, c)
        self.slot_embedding = nn.Parameter(torch.randn(n, c) * 0.02)
        self.null_tokens = nn.Parameter(torch.randn(n, c) * 0.02)
        self.norm = nn.LayerNorm(c, eps=1e-5)
        self.pool_proj = nn.Linear(c, temb)

    def forward(self, emb, present, drop):
        b, n, _ = emb.shape
        q = self.query_proj(emb.narrow(1, 0, 1))
        if n > 1:
            tokens = torch.cat([q, self.knn_proj(emb.narrow(1, 1, n - 1))], 1)
        else:
            tokens = q
        tokens = self.norm(tokens + self.slot_embedding.unsqueeze(0))
        keep = (present * (torch.ones_like(drop) - drop).unsqueeze(1)).unsqueeze(-1).to(tokens.dtype)
        null = self.null_tokens.unsqueeze(0).expand(b, n, -1)
        tokens = tokens * keep + null * (torch.ones_like(keep) - keep)
        pooled = self.pool_proj(tokens.mean(1, dtype=tokens.dtype))
        return tokens, pooled


class UNet(nn.Module):
    """`UNet::new` / `UNet::forward` of unet.rs."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        mc = cfg["model_channels"]
        temb = 4 * mc  # time_channels()
        self.time_embed = nn.Sequential(nn.Linear(mc, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.cond = ConditionEncoder(cfg, temb)
        levels = len(cfg["channel_mult"])

        def attn_at(level):
            return (cfg["image_size_px"] >> level) in cfg["attention_resolutions_px"]

        self.input_blocks = nn.ModuleList([nn.ModuleList([conv3(cfg["in_channels"], mc)])])
        skips = [mc]
        ch = mc
        for level, mult in enumerate(cfg["channel_mult"]):
            for _ in range(cfg["num_res_blocks"]):
                out = mc * mult
                block = [ResBlock(ch, out, temb, cfg)]
                ch = out
                if attn_at(level):
                    block.append(AttentionBlock(ch, cfg))
                self.input_blocks.append(nn.ModuleList(block))
                skips.append(ch)
            if level + 1 < levels:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)

        self.middle_block = nn.ModuleList(
            [ResBlock(ch, ch, temb, cfg), AttentionBlock(ch, cfg), ResBlock(ch, ch, temb, cfg)]
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            mult = cfg["channel_mult"][level]
            for i in range(cfg["num_res_blocks"] + 1):
                skip = skips.pop()
                out = mc * mult
                block = [ResBlock(ch + skip, out, temb, cfg)]
                ch = out
                if attn_at(level):
                    block.append(AttentionBlock(ch, cfg))
                if level > 0 and i == cfg["num_res_blocks"]:
                    block.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(block))

        self.out = nn.Sequential(norm(cfg["norm_groups"], ch), nn.SiLU(), zero_conv(ch, cfg["in_channels"], 3))

    def forward(self, x, t, cond_emb, present, drop):
        temb = timestep_embedding(t, self.cfg["model_channels"]).to(x.dtype)
        emb = self.time_embed[2](F.silu(self.time_embed[0](temb)))
        ctx, pooled = self.cond(cond_emb, present, drop)
        emb = emb + pooled
        hs = []
        h = x
        for block in self.input_blocks:
            h = run_stage(block, h, emb, ctx)
            hs.append(h)
        h = run_stage(self.middle_block, h, emb, ctx)
        for block in self.output_blocks:
            h = run_stage(block, torch.cat([h, hs.pop()], 1), emb, ctx)
        return self.out[2](F.silu(self.out[0](h)))


def parameter_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# The diffusion process: diffusion.rs (cosine schedule, epsilon prediction).
# --------------------------------------------------------------------------------------


def cosine_betas(steps):
    """`cosine_betas`: diffusers' betas_for_alpha_bar, computed in f64, stored as f32."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2.0) ** 2

    return [min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]


def alphas_cumprod_cosine(steps):
    betas = torch.tensor(cosine_betas(steps), dtype=torch.float32)
    return (torch.ones_like(betas) - betas).cumprod(0, dtype=torch.float32)  # CPU, as in Rust


def coefficients(alphas_cumprod, t, like):
    """sqrt(abar_t) and sqrt(1 - abar_t), gathered and shaped to broadcast over `like`."""
    abar = alphas_cumprod.to(like.device).index_select(0, t.to(like.device))
    shape = [-1] + [1] * (like.dim() - 1)
    sqrt_a = abar.pow(0.5).view(shape)
    sqrt_1ma = (torch.ones_like(abar) - abar).pow(0.5).view(shape)
    return sqrt_a.to(like.dtype), sqrt_1ma.to(like.dtype)


def q_sample(alphas_cumprod, x0, noise, t):
    a, b = coefficients(alphas_cumprod, t, x0)
    return a * x0 + b * noise


def losses(model_output, noise):
    """Per-sample 'simple' MSE against the epsilon target, [B]."""
    target = noise.to(torch.float32)
    dims = list(range(1, model_output.dim()))
    return (model_output.to(torch.float32) - target).square().mean(dims, dtype=torch.float32)


# --------------------------------------------------------------------------------------
# Benchmark.
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "small", "base", "paper-400m"], default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=10, help="neighbours (k+1 condition tokens)")
    p.add_argument("--dim", type=int, default=64, help="condition embedding dimension")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--precision",
        choices=["auto", "f32", "bf16", "f16"],
        default="auto",
        help="auto: f32 on the CPU, bf16 autocast on CUDA (as the Rust trainer)",
    )
    p.add_argument(
        "--foreach",
        choices=["default", "on", "off"],
        default="default",
        help="AdamW foreach (default: torch's choice, i.e. on for CUDA, off for CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count-only", action="store_true", help="build the model on the meta device, print its size, exit")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def resolve_device(choice):
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train_torch: --device cuda but torch sees no GPU")
    return torch.device(choice)


def resolve_autocast(precision, device):
    """None for f32, else the autocast dtype."""
    if precision == "f32" or (precision == "auto" and device.type == "cpu"):
        return None
    if device.type == "cpu":
        sys.exit("bench_train_torch: autocast precisions need a GPU here (as in the Rust trainer)")
    return {"auto": torch.bfloat16, "f16": torch.float16, "bf16": torch.bfloat16}[precision]


def emit(report, out):
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = unet_config(args.preset, args.image_size, args.dim, args.k)
    validate(cfg)
    base = {
        "preset": args.preset,
        "image_size": args.image_size,
        "batch": args.batch,
        "k": args.k,
        "dim": args.dim,
    }

    if args.count_only:
        with torch.device("meta"):
            model = UNet(cfg)
        report = dict(base, parameters=parameter_count(model), torch_version=torch.__version__)
        emit(report, args.out)
        return

    device = resolve_device(args.device)
    amp_dtype = resolve_autocast(args.precision, device)
    torch.manual_seed(args.seed)
    model = UNet(cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    note(f"{args.preset} U-Net, {n_params / 1e6:.2f}M parameters, device {device}, "
         f"precision {'f32' if amp_dtype is None else str(amp_dtype).replace('torch.', '')}")

    foreach = {"default": None, "on": True, "off": False}[args.foreach]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=foreach)
    with torch.no_grad():
        ema = [p.detach().clone() for p in params]
    alphas_cumprod = alphas_cumprod_cosine(TIMESTEPS)

    # Inputs, built once.
    b, n, s = args.batch, args.k + 1, args.image_size
    g = torch.Generator().manual_seed(args.seed + 1)
    images = (torch.rand(b, 3, s, s, generator=g) * 2 - 1).to(device)
    cond_emb = torch.randn(b, n, args.dim, generator=g).to(device)
    present = torch.ones(b, n).to(device)
    drop = torch.zeros(b).to(device)
    t = torch.randint(0, TIMESTEPS, (b,), generator=g, dtype=torch.int64).to(device)
    noise = torch.randn(b, 3, s, s, generator=g).to(device)
    weight = torch.ones(b).to(device)
    accum = 1

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step(step):
        for p in params:  # the Rust loop zeroes existing gradients in place
            if p.grad is not None:
                p.grad.zero_()
        torch.manual_seed((args.seed ^ (step * accum) * 0x9E3779B9) & 0x7FFF_FFFF_FFFF_FFFF)
        with autocast():
            xt = q_sample(alphas_cumprod, images, noise, t)
            out = model(xt, t, cond_emb, present, drop)
            per = losses(out, noise)
            loss = (per * weight).sum(dtype=torch.float32) / weight.sum(dtype=torch.float32).clamp_min(1.0)
        (loss / accum).backward()
        loss_value = loss.item() / accum
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        d = min(EMA_DECAY, (1 + step + 1) / (10 + step + 1))  # Ema::update(params, step + 1)
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1.0 - d)
        return loss_value

    step = 0
    for _ in range(args.warmup):
        train_step(step)
        step += 1
    sync()
    times = []
    loss_value = float("nan")
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss_value = train_step(step)
        sync()
        times.append(time.perf_counter() - t0)
        step += 1

    report = dict(
        base,
        parameters=n_params,
        step_time_s_median=statistics.median(times) if times else None,
        step_time_s_mean=statistics.fmean(times) if times else None,
        steps=args.steps,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        warmup=args.warmup,
        device=str(device),
        precision="f32" if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        foreach=args.foreach,
        step_times_s=times,
        last_loss=loss_value,
    )
    emit(report, args.out)


if __name__ == "__main__":
    main()
