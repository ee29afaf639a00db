#!/usr/bin/env python3
"""Reads a CLIP directory written by `knn-diffusion train-clip` the way a user of HF
transformers would, and writes what it computes, for the Rust test that checks the export.

Usage::

    python python/check_clip_export.py --model DIR --images a.png b.png --texts "x" "y" --out OUT.json

* The model: ``transformers.CLIPModel.from_pretrained(DIR)`` (no hub access).
* The tokenizer: ``tokenizers.Tokenizer.from_file(DIR/tokenizer.json)``, padded with the
  config's ``pad_token_id`` to the context length and truncated to it, as the Rust side does.
* The images: ``CLIPImageProcessor`` from ``DIR/preprocessor_config.json`` (Pillow backend).

OUT.json holds ``input_ids``, ``image_embeds`` and ``text_embeds`` (``get_image_features`` /
``get_text_features``, not normalised) and ``missing_keys`` (weights the file lacked, which
transformers would have initialised at random: must be empty).
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil


def features(r) -> list:
    """transformers 5 returns an output whose pooler_output is the projection; 4.x a tensor."""
    return (r.pooler_output if hasattr(r, "pooler_output") else r).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", nargs="*", default=[])
    ap.add_argument("--texts", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    model, info = CLIPModel.from_pretrained(a.model, output_loading_info=True)
    model.eval()
    cfg = model.config.text_config
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    tok.enable_truncation(cfg.max_position_embeddings)
    tok.enable_padding(length=cfg.max_position_embeddings, pad_id=cfg.pad_token_id)
    ids = [e.ids for e in tok.encode_batch(a.texts)]
    proc = CLIPImageProcessorPil.from_pretrained(a.model)
    images = [Image.open(p).convert("RGB") for p in a.images]
    out = {"input_ids": ids, "missing_keys": list(info.get("missing_keys", []))}
    with torch.no_grad():
        if images:
            px = proc(images=images, return_tensors="pt")["pixel_values"]
            out["image_embeds"] = features(model.get_image_features(pixel_values=px))
        if ids:
            t = torch.tensor(ids, dtype=torch.long)
            out["text_embeds"] = features(model.get_text_features(input_ids=t))
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
