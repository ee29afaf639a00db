#!/usr/bin/env python3
"""Reference outputs of Pillow's resampling and JPEG draft decoding, for the Rust image path.

Usage::

    python python/make_image_fixture.py --out DIR

Writes into DIR:

* ``src_<name>.png`` -- synthetic photo-like RGB images (smooth colour fields, edges and
  grain, so every filter tap matters), at sizes around what web images have;
* ``resize_<name>_<filter>_<w>x<h>.png`` -- ``Image.resize((w, h), filter)`` of each source
  (Pillow's BILINEAR, BICUBIC, LANCZOS; no ``reducing_gap``, as HF's processor calls it), for
  the CLIP input size (shortest side 224), the stored image (shortest side 64) and an upscale;
* ``<name>.jpg`` -- the source saved by Pillow as JPEG (quality 90, 4:2:0, baseline and one
  progressive), with ``jpeg_full_<name>.png`` (Pillow's full decode) and
  ``jpeg_draft_<name>_<side>.png`` (``draft("RGB", (side, side))`` then ``convert("RGB")``);
* ``reference.json`` -- every case: file names, sizes, filter, and Pillow's version.

The Rust tests (datasets/tests/it/image_parity.rs) compare our resampler with these within
one 8-bit level per pixel, and our scaled JPEG decode with Pillow's draft within a stated
bound.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
# name, width, height
SOURCES = [
    ("landscape", 512, 384),
    ("portrait", 384, 512),
    ("odd", 451, 300),
    ("square", 257, 257),
    ("large", 1000, 750),
]


def shortest_side(w, h, s):
    """HF's get_resize_output_image_size(default_to_square=False): the long side truncates."""
    if w <= h:
        return s, s * h // w
    return s * w // h, s


def photo_like(w, h, seed):
    """Texture in luminance, colour that varies slowly (as in photographs, which is what 4:2:0
    JPEGs assume), hard-edged discs for object boundaries, and grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)

    def waves(count, fmin, fmax, amp):
        out = np.zeros((h, w))
        for _ in range(count):
            fx, fy = rng.uniform(fmin, fmax, 2)
            phase = rng.uniform(0, 2 * np.pi)
            out += rng.uniform(*amp) * np.sin((fx * x + fy * y) * 2 * np.pi + phase)
        return out

    luma = waves(6, 0.002, 0.05, (10, 30))
    img = np.stack([128 + luma + waves(3, 0.0005, 0.006, (15, 40)) for _ in range(3)], axis=-1)
    for _ in range(5):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, min(w, h) / 4)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3) + 0.3 * luma[mask][:, None]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cases = {"pillow": PIL.__version__, "resize": [], "jpeg": []}
    for seed, (name, w, h) in enumerate(SOURCES):
        src = Image.fromarray(photo_like(w, h, seed), mode="RGB")
        src.save(out / f"src_{name}.png")
        targets = [shortest_side(w, h, 224), shortest_side(w, h, 64), (w * 3 // 2, h + 7)]
        for fname, flt in FILTERS.items():
            for tw, th in targets:
                file = f"resize_{name}_{fname}_{tw}x{th}.png"
                src.resize((tw, th), flt).save(out / file)
                cases["resize"].append(dict(source=f"src_{name}.png", filter=fname, width=tw, height=th, file=file))
        progressive = name == "portrait"
        src.save(out / f"{name}.jpg", quality=90, subsampling="4:2:0", progressive=progressive)
        full = Image.open(out / f"{name}.jpg")
        full.convert("RGB").save(out / f"jpeg_full_{name}.png")
        drafts = []
        for side in (224, 64):
            im = Image.open(out / f"{name}.jpg")
            im.draft("RGB", (side, side))
            im = im.convert("RGB")
            file = f"jpeg_draft_{name}_{side}.png"
            im.save(out / file)
            drafts.append(dict(side=side, file=file, width=im.width, height=im.height))
        cases["jpeg"].append(
            dict(name=name, file=f"{name}.jpg", full=f"jpeg_full_{name}.png", width=w, height=h,
                 progressive=progressive, drafts=drafts)
        )
    (out / "reference.json").write_text(json.dumps(cases, indent=1))
    print(f"wrote {len(cases['resize'])} resize and {len(cases['jpeg'])} JPEG cases to {out}")


if __name__ == "__main__":
    main()
