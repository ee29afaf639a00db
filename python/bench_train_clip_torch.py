#!/usr/bin/env python3
"""PyTorch-eager peer of `knn-diffusion bench train-clip`: the same CLIP training step.

What it is
    The model is HF transformers' ``CLIPModel`` built from the ``config.json`` the Rust side
    writes for the benchmarked preset (the same layers, shapes and parameter names as
    ``indexer/src/clip/model.rs``, which is written layer for layer after it). The step is
    the one ``trainer/src/train_clip/mod.rs`` runs on one rank:
      zero the gradients -> image and text features -> L2-normalise -> logits scaled by
      exp(logit_scale) -> symmetric cross-entropy (``loss.rs``) -> backward -> loss.item() ->
      clip_grad_norm_(1.0) -> AdamW (lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.1 on
      the weight matrices only) -> clamp logit_scale to [0, ln 100].

What it measures
    Random inputs made once: pixel values randn ``[B, 3, S, S]``; token ids uniform in
    [3, vocab) with the end token (id 1) at a random position and padding (id 2) after it.
    ``--warmup`` untimed steps, then ``--steps`` timed ones.

Output
    JSON on stdout and in ``--out``: parameters, step_time_s_median, step_time_s_mean,
    step_times_s, threads, torch_version, last_loss.

Example
    python python/bench_train_clip_torch.py --config clip-config.json --batch 256 \
        --steps 10 --warmup 2 --threads 2 --out torch-clip.json
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="config.json of the CLIP to train")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    with open(a.config) as f:
        cfg = CLIPConfig.from_dict(json.load(f))
    model = CLIPModel(cfg)
    model.train()
    tc, vc = cfg.text_config, cfg.vision_config
    b, s, ctx = a.batch, vc.image_size, tc.max_position_embeddings
    pixels = torch.randn(b, 3, s, s)
    ids = torch.randint(3, tc.vocab_size, (b, ctx))
    ends = torch.randint(1, ctx, (b,))
    for i in range(b):
        ids[i, ends[i]] = tc.eos_token_id
        ids[i, ends[i] + 1 :] = tc.pad_token_id

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    labels = torch.arange(b)

    def feats(r):
        return r.pooler_output if hasattr(r, "pooler_output") else r

    times, loss_v = [], float("nan")
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        img = F.normalize(feats(model.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(feats(model.get_text_features(input_ids=ids)), dim=-1)
        logits = img @ txt.t() * model.logit_scale.exp()
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
        loss_v = loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)

    out = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_time_s_median": statistics.median(times),
        "step_time_s_mean": statistics.fmean(times),
        "step_times_s": times,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "last_loss": loss_v,
    }
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
