#!/usr/bin/env python3
"""Python reference peer for ``knn-diffusion bench embed``: CLIP image-embedding throughput.

Usage::

    python python/bench_embed_reference.py --images DIR --config CONFIG_JSON \\
        --batch-size B --workers W [--threads T] [--warmup-batches 2] [--limit N]

What it measures
----------------
The pipeline a Python user would idiomatically write to CLIP-embed a folder of
images, timed on CPU:

* a ``torch.utils.data.Dataset`` whose ``__getitem__`` opens the file with
  Pillow, flattens any alpha onto a WHITE background (``Image.alpha_composite``
  onto an opaque white RGBA image, then ``convert("RGB")`` -- the same
  flattening the Rust side does), and runs the Pillow-backed Hugging Face
  processor ``transformers.models.clip.CLIPImageProcessorPil`` (resize shortest
  edge to S with bicubic, center-crop SxS, rescale 1/255, normalise with the
  OpenAI CLIP mean/std; S = ``vision_config.image_size``) into a float32
  ``[3, S, S]`` tensor;
* a ``DataLoader(batch_size=B, num_workers=W, shuffle=False,
  persistent_workers=False)`` (default multiprocessing start method and
  collate; workers keep torch's default of 1 intra-op thread);
* the model step ``with torch.inference_mode():
  model.get_image_features(pixel_values=x).pooler_output`` followed by L2
  normalisation, on ``transformers.CLIPModel(CLIPConfig(**json))`` built with
  random weights (``torch.manual_seed(0)``), ``eval()``, float32, CPU, with
  ``torch.set_num_threads(T)`` in the main process (default: CPUs available to
  this process).

Nothing is downloaded: the model comes from the config JSON alone (random
weights -- throughput does not depend on weight values).

Stages, in the order they run (each one prints progress to stderr):

1. ``decode_preprocess_img_per_s`` -- ``Dataset.__getitem__`` over all N images
   in the main process, single torch thread, no model, no DataLoader. This is
   also the pass that brings the image files into the OS page cache, so the
   later stages read from a warm cache.
2. warm-up -- ``--warmup-batches`` model steps on random ``[B,3,S,S]`` input,
   not counted.
3. ``end_to_end_img_per_s`` -- N / wall time from creating the DataLoader
   iterator (worker start-up included) to the last L2-normalised embedding
   (``elapsed_s`` is this wall time).
4. ``model_only_img_per_s`` -- the same model step (incl. L2 normalisation) on a
   fixed random tensor ``[B,3,S,S]``, for as many batches as stage 3 had, after
   another warm-up; the last batch is sliced to the same size as stage 3's last
   (possibly partial) batch, so both stages embed exactly N images.

``peak_rss_mb`` = ``getrusage(RUSAGE_SELF).ru_maxrss`` +
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (both also reported separately). Note
the children figure is the peak of the *largest single* reaped DataLoader
worker (not a sum over workers), and forked workers count the pages they
share copy-on-write with the parent, so the sum over-counts real memory use;
it is an upper bound comparable between runs of this script, not an exact
footprint. Also, ``import torch`` itself (the CUDA wheel) forks ``ldconfig -p``
and Linux charges the parent's RSS at fork time to that child's peak, so the
children figure has a floor of roughly the RSS of a freshly imported torch
(~430 MB measured here) even with ``--workers 0``;
``peak_rss_children_before_loader_mb`` (read just before the DataLoader is
created) shows that floor, and only a children peak above it is due to the
DataLoader workers.

Comparability with ``knn-diffusion bench embed``
------------------------------------------------
The numbers are comparable when both sides run on the same images (same DIR,
same ``--limit``; files are taken recursively in sorted path order), the same
model config JSON (same architecture; both use random/any weights, float32),
the same batch size, and the same CPU with the same thread / worker counts
(``--threads`` here vs. the Rust side's intra-op threads; ``--workers`` vs. its
decode workers), with nothing else heavy running on the machine. Stage
definitions match: end-to-end = decode + preprocess + model + L2 normalise
over all images, model-only = forward + normalise on a fixed tensor,
decode_preprocess = single-threaded decode + alpha flatten + preprocess.

Output: exactly ONE JSON object on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402
from transformers.image_utils import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.models.clip import CLIPImageProcessorPil  # noqa: E402

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def list_images(root: Path, limit: int | None) -> list[Path]:
    paths = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if limit is not None:
        paths = paths[:limit]
    return paths


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """Flatten any transparency onto an opaque white background, return RGB."""
    rgba = img.convert("RGBA")  # also handles L/LA/P(+transparency)/RGB
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


class ImageFolderDataset(Dataset):
    def __init__(self, paths: list[Path], processor: CLIPImageProcessorPil):
        self.paths = paths
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            rgb = to_rgb_on_white(img)
        out = self.processor(images=rgb, return_tensors="pt")
        return out["pixel_values"][0]  # [3, S, S] float32


def make_processor(size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        resample=PILImageResampling.BICUBIC,
    )


def embed(model: CLIPModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model.get_image_features(pixel_values=x)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.nn.functional.normalize(feats, p=2, dim=-1)


def warm_up(model: CLIPModel, x: torch.Tensor, batches: int) -> None:
    for _ in range(batches):
        embed(model, x)


def maxrss_mb(who: int) -> float:
    rss = resource.getrusage(who).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--images", required=True, type=Path, help="folder of images (recursive)")
    ap.add_argument("--config", required=True, type=Path, help="HF CLIPConfig-shaped JSON")
    ap.add_argument("--batch-size", required=True, type=int)
    ap.add_argument("--workers", required=True, type=int, help="DataLoader num_workers")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads in the main process (default: available CPUs)")
    ap.add_argument("--warmup-batches", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N sorted images")
    args = ap.parse_args()

    if args.batch_size < 1 or args.workers < 0 or args.warmup_batches < 0:
        ap.error("--batch-size must be >= 1, --workers and --warmup-batches >= 0")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    threads = args.threads if args.threads is not None else available_cpus()
    if threads < 1:
        ap.error("--threads must be >= 1")

    # Keep stdout for the single JSON result; anything a library prints goes to stderr.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr

    paths = list_images(args.images, args.limit)
    if not paths:
        log(f"no images under {args.images}")
        return 2
    n = len(paths)
    bs = args.batch_size
    n_batches = math.ceil(n / bs)

    cfg = CLIPConfig(**json.loads(args.config.read_text()))
    size = int(cfg.vision_config.image_size)
    torch.manual_seed(0)
    model = CLIPModel(cfg).to(dtype=torch.float32, device="cpu").eval()
    processor = make_processor(size)
    dataset = ImageFolderDataset(paths, processor)
    log(f"{n} images, batch {bs} ({n_batches} batches), workers {args.workers}, "
        f"threads {threads}, image_size {size}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}")

    # 1. decode + preprocess, main process, single thread, no model.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for i in range(n):
        dataset[i]
    decode_s = time.perf_counter() - t0
    log(f"decode_preprocess: {n} images in {decode_s:.3f}s")

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    fixed = torch.randn(bs, 3, size, size, generator=gen, dtype=torch.float32)

    # 2. warm-up (not counted).
    warm_up(model, fixed, args.warmup_batches)

    # 3. end to end: DataLoader iterator creation -> last embedding.
    rss_children_before = maxrss_mb(resource.RUSAGE_CHILDREN)
    loader = DataLoader(dataset, batch_size=bs, num_workers=args.workers,
                        shuffle=False, persistent_workers=False)
    embeddings = []
    t0 = time.perf_counter()
    for x in loader:
        embeddings.append(embed(model, x))
    e2e_s = time.perf_counter() - t0
    emb = torch.cat(embeddings)
    assert emb.shape[0] == n and len(embeddings) == n_batches, (emb.shape, len(embeddings))
    log(f"end_to_end: {n} images in {e2e_s:.3f}s; embeddings {tuple(emb.shape)}, "
        f"norms {emb.norm(dim=-1).min().item():.4f}..{emb.norm(dim=-1).max().item():.4f}")

    # 4. model only: same batches (same sizes) on a fixed random tensor.
    warm_up(model, fixed, args.warmup_batches)
    t0 = time.perf_counter()
    for b in range(n_batches):
        embed(model, fixed[: min(bs, n - b * bs)])
    model_s = time.perf_counter() - t0
    log(f"model_only: {n} images in {model_s:.3f}s")

    rss_self = maxrss_mb(resource.RUSAGE_SELF)
    rss_children = maxrss_mb(resource.RUSAGE_CHILDREN)
    result = {
        "images": n,
        "batch_size": bs,
        "workers": args.workers,
        "threads": threads,
        "end_to_end_img_per_s": n / e2e_s,
        "model_only_img_per_s": n / model_s,
        "decode_preprocess_img_per_s": n / decode_s,
        "elapsed_s": e2e_s,
        "peak_rss_mb": rss_self + rss_children,
        "peak_rss_self_mb": rss_self,
        "peak_rss_children_mb": rss_children,
        "peak_rss_children_before_loader_mb": rss_children_before,
        "batches": n_batches,
        "warmup_batches": args.warmup_batches,
        "image_size": size,
        "embed_dim": int(emb.shape[1]),
        "cpus": available_cpus(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(result), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
