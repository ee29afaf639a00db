#!/usr/bin/env python3
"""Python reference peer for ``knn-diffusion bench image-path``: one thread's image work.

Usage::

    python python/bench_image_path.py --images DIR [--size 224] [--stored 64] [--passes 3]

For every file in DIR (sorted), in this process, on one thread, timed over ``--passes``
passes after one untimed pass that warms the page cache (the median pass is reported):

* ``draft_preprocess`` -- ``Image.open``; ``draft("RGB", (size, size))`` (libjpeg-turbo's
  scaled IDCT: 1/2, 1/4 or 1/8 while both sides stay >= size); ``convert("RGB")``; the
  Pillow-backed HF processor ``CLIPImageProcessorPil`` (bicubic shortest edge to ``size``,
  center crop, rescale, normalise) to a float32 ``[3, size, size]`` array. What a Python user
  who knows about ``draft`` writes.
* ``draft_preprocess_store`` -- the same, plus the stored training image the embed stage also
  makes: shortest side to ``stored`` with LANCZOS, center crop, PNG encode into memory.
* ``full_preprocess`` -- as ``draft_preprocess`` without ``draft`` (HF's own path).

Prints one JSON object on stdout: images, and img/s for each measure, plus versions.
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.clip import CLIPImageProcessorPil


def processor(size):
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        resample=PILImageResampling.BICUBIC,
    )


def stored_png(img, side):
    w, h = img.size
    if w <= h:
        nw, nh = side, side * h // w
    else:
        nw, nh = side * w // h, side
    small = img.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - side) // 2, (nh - side) // 2
    small = small.crop((left, top, left + side, top + side))
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    return buf.getvalue()


def one(path, proc, size, draft, stored):
    with Image.open(path) as img:
        if draft:
            img.draft("RGB", (size, size))
        rgb = img.convert("RGB")
    x = proc(images=rgb, return_tensors="np")["pixel_values"][0]
    assert x.shape == (3, size, size) and x.dtype == np.float32
    if stored:
        stored_png(rgb, stored)


def rate(paths, proc, size, draft, stored, passes):
    for p in paths:  # untimed: page cache and lazy imports
        one(p, proc, size, draft, stored)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for p in paths:
            one(p, proc, size, draft, stored)
        times.append(time.perf_counter() - start)
    times.sort()
    return len(paths) / times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--stored", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = sorted(p for p in args.images.iterdir() if p.is_file())
    if not paths:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    proc = processor(args.size)
    out = {
        "images": len(paths),
        "draft_preprocess_img_per_s": rate(paths, proc, args.size, True, 0, args.passes),
        "draft_preprocess_store_img_per_s": rate(paths, proc, args.size, True, args.stored, args.passes),
        "full_preprocess_img_per_s": rate(paths, proc, args.size, False, 0, args.passes),
        "pillow": PIL.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
