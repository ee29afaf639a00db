#!/usr/bin/env python3
"""Generate the tiny-CLIP parity fixture for the Rust (tch) CLIP re-implementation.

Usage::

    python python/make_clip_fixture.py --out DIR

Everything is created locally (no HF hub access) and deterministically; running
the script twice produces byte-identical files. DIR receives:

* ``config.json`` + ``model.safetensors`` -- a tiny, randomly initialised
  ``transformers.CLIPModel`` (float32; text/vision width 64, 2 layers, 4 heads,
  ViT-B/32 geometry 224/32, projection_dim 48) whose LayerNorm weights/biases
  and all biases are perturbed with noise so that a wrong mapping is detected.
* ``tokenizer.json``, ``tokenizer_config.json`` (+ whatever else
  ``save_pretrained`` writes) -- a small CLIP-style byte-level BPE
  (vocab laid out like OpenAI's: 256 bytes, 256 bytes + ``</w>``, merges,
  ``<|startoftext|>``, ``<|endoftext|>``) trained on an inline corpus.
* ``preprocessor_config.json`` -- OpenAI CLIP image-processor defaults.
* ``images/*.png`` -- synthetic RGB test images of several sizes.
* ``reference.safetensors`` -- ``pixel_values_<i>`` (f32 [3,224,224]),
  ``pixel_u8_<i>`` (u8 [3,224,224], resized+cropped image before rescale /
  normalise), ``image_pooled`` / ``image_embeds`` (f32 [N,64] / [N,48]),
  ``input_ids`` / ``attention_mask`` (i64 [M,77]), ``text_pooled`` /
  ``text_embeds`` (f32 [M,64] / [M,48]), ``logits_per_image`` (f32 [N,M]).
* ``reference.json`` -- file names, texts, image sizes, token ids and the
  (small) embeddings as plain lists, plus versions used.

These files are consumed by the Rust CLIP parity test (tch CLIPModel +
CLIPImageProcessor re-implementation), which should load DIR like an HF
checkpoint directory and compare against the reference tensors.

What was verified in the installed transformers 5.24.0 source:

* ``transformers/models/clip/image_processing_clip.py``: in 5.x the class named
  ``CLIPImageProcessor`` is the *torchvision* backend (``TorchvisionBackend``).
  The Pillow-based processor is ``CLIPImageProcessorPil``
  (``models/clip/image_processing_pil_clip.py``, subclass of
  ``image_processing_backends.PilBackend``). ``AutoImageProcessor`` picks
  torchvision when available unless ``backend="pil"`` (``use_fast=False`` is a
  deprecated alias for that). ``PilBackend.to_dict`` strips the ``Pil`` suffix,
  so the saved ``image_processor_type`` is ``"CLIPImageProcessor"``.
* ``PilBackend._preprocess`` does resize -> center_crop -> rescale ->
  normalize. ``PilBackend.resize`` (shortest_edge) computes the target size with
  ``image_transforms.get_resize_output_image_size(default_to_square=False)``:
  ``new_long = int(224 * long / short)`` (float division, truncation), then
  ``image_transforms.resize`` converts the uint8 CHW array to a PIL image
  (no rescale for uint8) and calls ``PIL.Image.Image.resize((w, h),
  resample=BICUBIC, reducing_gap=None)`` and converts back to uint8.
  ``center_crop`` uses ``top = (h - 224) // 2``, ``left = (w - 224) // 2``.
  ``rescale`` is ``(u8.astype(float64) * (1/255)).astype(float32)``,
  ``normalize`` is ``(x - mean) / std`` in float32.
  This script re-checks all of that numerically (direct PIL bicubic resize +
  crop must equal ``pixel_u8``; the float formula must reproduce
  ``pixel_values`` exactly).
* ``CLIPTextModel.forward`` pools at the *first* ``eos_token_id`` position
  (``(input_ids == eos).int().argmax(-1)``) unless ``eos_token_id == 2``
  (legacy argmax-of-ids rule); the eos id here is the last vocab id, not 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

# Seeds (all randomness in the fixture derives from these).
MODEL_INIT_SEED = 0
PERTURB_SEED = 1234
IMAGE_SEED_BASE = 20240

TEXT_MAX_LENGTH = 77
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
PROJECTION_DIM = 48
IMAGE_SIZE = 224
PATCH_SIZE = 32

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Small inline training corpus for the BPE (English captions + emoji names).
CORPUS = [
    "a red cat", "a black cat sitting on a sofa", "a photo of a cat", "a photo of a dog",
    "a photo of two dogs playing in the park", "a close up photo of a cute puppy",
    "a rocket in space", "a rocket launching into the night sky", "an astronaut riding a horse",
    "a painting of a sunset over the ocean", "a watercolor painting of a mountain lake",
    "a drawing of a house with a red roof", "a black and white photo of a city street",
    "a bowl of fruit on a wooden table", "a green apple and a yellow banana",
    "a cup of hot coffee", "a slice of pizza with cheese", "a plate of spaghetti",
    "a bird flying over the water", "a small boat on a calm lake", "a train at the station",
    "a red car parked on the street", "a blue bicycle leaning against a wall",
    "a person walking in the rain with an umbrella", "children playing football on the grass",
    "a snowy forest in winter", "a field of sunflowers in summer", "autumn leaves on the ground",
    "a lighthouse on a rocky coast", "the moon and the stars at night",
    "a portrait of a smiling woman", "a man wearing a hat and glasses",
    "a diagram of a neural network", "a screenshot of a computer program",
    "a cartoon of a happy robot", "a logo with a blue circle", "a map of the world",
    "grinning face", "smiling face with heart eyes", "face with tears of joy", "red heart",
    "thumbs up", "party popper", "fire", "sparkles", "rocket", "rainbow", "sun with face",
    "cat face", "dog face", "unicorn", "pizza", "birthday cake", "glowing star",
    "crying face", "thinking face", "winking face", "folded hands", "clapping hands",
    "waving hand", "globe showing europe", "high voltage", "white flower", "four leaf clover",
    "it's a photo of the sky", "they're playing in the snow", "we'll see the sea",
    "the quick brown fox jumps over the lazy dog", "a picture of a kitchen with a white fridge",
    "an old castle on a hill", "a tiger resting in the shade", "an elephant walking in the savanna",
    "a penguin standing on the ice", "a jellyfish glowing in the dark water",
    "photo of 3 cats and 2 dogs", "a clock showing 10 past 9",
]

# Texts for the reference outputs (index 0 is "the first text").
TEST_TEXTS = [
    "a photo of a red cat",
    # case folding, runs of whitespace, punctuation, contraction, digits.
    "A  Rocket   in SPACE!! It's 2024",
    # unknown words / bytes: words absent from the corpus, a decomposed
    # "cafe\u0301" (NFC -> "caf\u00e9"), an emoji (multi-byte UTF-8).
    "a xylophone in the cafe\u0301 next to a zebra \U0001F993",
    # longer than 77 tokens -> truncated to bos + 75 tokens + eos.
    " ".join(["a watercolor painting of a mountain lake at sunset with birds"] * 8),
    # empty text -> [bos, eos, pad...]
    "",
]

# (file name, width, height, seed) -- PNG, RGB without alpha.
IMAGE_SPECS = [
    ("landscape_640x480.png", 640, 480, 1),  # downscale, resized to 298x224
    ("portrait_300x500.png", 300, 500, 2),  # resized to 224x373, crop top=74
    ("small_64x64.png", 64, 64, 3),  # upscale to 224x224
    ("odd_223x225.png", 223, 225, 4),  # resized to 224x226, crop top=1
    ("wide_1001x250.png", 1001, 250, 5),  # resized to 896x224, crop left=336
]


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable unicode table, in OpenAI's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(out_dir: Path):
    """Train a CLIP-style byte-level BPE on CORPUS and wrap it as CLIPTokenizer."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    byte_chars = bytes_to_unicode()

    # Take the exact normaliser / pre-tokenizer transformers uses for CLIP.
    template = CLIPTokenizer()
    trainer_tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainer_tok.normalizer = template.backend_tokenizer.normalizer
    trainer_tok.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=byte_chars,
        end_of_word_suffix="</w>",
    )
    trainer_tok.train_from_iterator(CORPUS, trainer=trainer)

    raw_merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw_merges]

    # OpenAI CLIP layout: bytes, bytes + </w>, merge results, bos, eos.
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(vocab_list)
    for a, b in merges:
        assert a in seen and b in seen, (a, b)
        tok = a + b
        if tok not in seen:
            seen.add(tok)
            vocab_list.append(tok)
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}

    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=TEXT_MAX_LENGTH,
    )
    tokenizer.save_pretrained(str(out_dir))
    print(f"tokenizer: {len(merges)} merges, vocab size {len(tokenizer)}, "
          f"bos={tokenizer.bos_token_id} eos={tokenizer.eos_token_id} pad={tokenizer.pad_token_id}")
    return tokenizer


def build_model(tokenizer):
    """Tiny random CLIPModel with perturbed LayerNorm params and biases."""
    import torch
    from torch import nn
    from transformers import CLIPConfig, CLIPModel

    assert tokenizer.eos_token_id != 2, "eos id 2 would select the legacy argmax pooling rule"
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        projection_dim=PROJECTION_DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        projection_dim=PROJECTION_DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=PROJECTION_DIM)

    torch.manual_seed(MODEL_INIT_SEED)
    model = CLIPModel(config)

    # Default init makes LayerNorm weight=1 / bias=0 and Linear biases 0: perturb
    # them so that a swapped / missing mapping changes the outputs.
    ln_params = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            ln_params.add(id(module.weight))
            ln_params.add(id(module.bias))
    gen = torch.Generator().manual_seed(PERTURB_SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if id(param) in ln_params or name.endswith("bias"):
                scale = 0.1 if id(param) in ln_params else 0.05
                param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    model.eval()
    return model


def make_image(width: int, height: int, seed: int) -> np.ndarray:
    """Deterministic RGB uint8 image: smooth gradients, shapes, stripes, noise."""
    rng = np.random.RandomState(IMAGE_SEED_BASE + seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    u = xx / max(width - 1, 1)
    v = yy / max(height - 1, 1)
    img = np.empty((height, width, 3), dtype=np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    img[..., 0] = 255 * (0.15 + 0.7 * u)
    img[..., 1] = 255 * (0.5 + 0.4 * np.sin(2 * np.pi * (1.5 * v + 0.5 * u) + phase[1]))
    r = np.sqrt((u - 0.5) ** 2 + (v - 0.5) ** 2)
    img[..., 2] = 255 * (0.5 + 0.45 * np.cos(6 * np.pi * r + phase[2]))
    # a few hard-edged discs and rectangles (resampling of edges matters)
    for _ in range(4):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rad = rng.uniform(0.08, 0.3) * min(width, height)
        color = rng.randint(0, 256, size=3)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < rad**2
        img[mask] = color
    for _ in range(3):
        x0, y0 = rng.randint(0, width), rng.randint(0, height)
        x1 = min(width, x0 + rng.randint(max(width // 10, 1), max(width // 3, 2)))
        y1 = min(height, y0 + rng.randint(max(height // 10, 1), max(height // 3, 2)))
        img[y0:y1, x0:x1] = rng.randint(0, 256, size=3)
    # fine stripes in one corner (high frequency -> aliasing on downscale)
    stripe = ((xx.astype(np.int64) // 2 + yy.astype(np.int64) // 3) % 2) == 0
    corner = (u > 0.75) & (v > 0.7)
    img[corner & stripe] = 255 - img[corner & stripe]
    img += rng.randint(-3, 4, size=img.shape)  # mild noise (keeps PNGs small)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_images(images_dir: Path) -> list[Path]:
    from PIL import Image

    if images_dir.exists():
        shutil.rmtree(images_dir)
    images_dir.mkdir(parents=True)
    paths = []
    for name, width, height, seed in IMAGE_SPECS:
        arr = make_image(width, height, seed)
        path = images_dir / name
        Image.fromarray(arr, mode="RGB").save(path, format="PNG", optimize=False)
        paths.append(path)
    return paths


def build_image_processor(out_dir: Path):
    from transformers import AutoImageProcessor, CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor.save_pretrained(str(out_dir))
    reloaded = AutoImageProcessor.from_pretrained(str(out_dir), backend="pil")
    assert type(reloaded) is CLIPImageProcessorPil, type(reloaded)
    assert int(reloaded.resample) == 3
    return reloaded


def process_images(processor, paths: list[Path]):
    """Run the Pillow CLIP processor; cross-check it against plain PIL + numpy."""
    from PIL import Image
    from transformers.image_transforms import get_resize_output_image_size

    results = []
    mean = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(CLIP_STD, dtype=np.float32)[:, None, None]
    for path in paths:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
        assert image.mode == "RGB"
        pixel_values = processor(images=image, return_tensors="np")["pixel_values"][0]
        assert pixel_values.dtype == np.float32 and pixel_values.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        u8 = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        assert np.array_equal(u8, np.rint(u8)) and u8.min() >= 0 and u8.max() <= 255
        u8 = u8.astype(np.uint8)

        # Independent re-computation: PIL bicubic resize + crop + float32 maths.
        w, h = image.size
        new_h, new_w = get_resize_output_image_size(
            np.zeros((3, h, w), np.uint8), size=IMAGE_SIZE, default_to_square=False, input_data_format="channels_first"
        )
        short, long = (w, h) if w <= h else (h, w)
        expect_long = int(IMAGE_SIZE * long / short)
        assert (new_h, new_w) == ((expect_long, IMAGE_SIZE) if w <= h else (IMAGE_SIZE, expect_long))
        resized = np.asarray(image.resize((new_w, new_h), resample=Image.BICUBIC)).transpose(2, 0, 1)
        top, left = (new_h - IMAGE_SIZE) // 2, (new_w - IMAGE_SIZE) // 2
        cropped = resized[:, top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
        assert np.array_equal(cropped, u8), f"{path.name}: direct PIL BICUBIC resize differs from processor"
        manual = ((u8.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
        assert np.array_equal(manual, pixel_values), f"{path.name}: rescale/normalize formula mismatch"

        results.append(
            dict(file=f"images/{path.name}", width=w, height=h, resized_width=int(new_w), resized_height=int(new_h),
                 crop_top=int(top), crop_left=int(left), pixel_values=pixel_values, pixel_u8=u8)
        )
    return results


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def to_list(t) -> list:
    return np.asarray(t).tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (created / overwritten)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)

    import PIL
    import safetensors
    import tokenizers
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from transformers import CLIPModel

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. tokenizer + model
    tokenizer = build_tokenizer(out)
    model = build_model(tokenizer)
    print(f"default attn implementation: {model.config._attn_implementation}")
    model.save_pretrained(str(out))  # transformers 5.x: always safetensors, no safe_serialization flag
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        print(f"model.safetensors: {len(keys)} tensors")
        for k in keys:
            t = f.get_slice(k)
            print(f"  {k} {t.get_dtype()} {t.get_shape()}")
            assert t.get_dtype() == "F32"

    # Use the reloaded checkpoint so the references correspond to the saved files.
    loaded = CLIPModel.from_pretrained(str(out))
    loaded.eval()
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    model = loaded
    attn_impl = model.config._attn_implementation

    # 3-4. image processor + images
    processor = build_image_processor(out)
    image_paths = write_images(out / "images")
    images = process_images(processor, image_paths)

    # 5. reference outputs
    enc = tokenizer(TEST_TEXTS, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt")
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    raw_tok = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    raw_tok.no_truncation()
    raw_tok.no_padding()
    untruncated = [len(raw_tok.encode(t).ids) for t in TEST_TEXTS]
    assert max(untruncated) > TEXT_MAX_LENGTH, "need one text that gets truncated"
    eos_pos = (input_ids == tokenizer.eos_token_id).int().argmax(-1)
    pixel_values = torch.from_numpy(np.stack([im["pixel_values"] for im in images]))

    with torch.no_grad():
        image_pooled = model.vision_model(pixel_values=pixel_values).pooler_output
        image_embeds = model.visual_projection(image_pooled)
        text_pooled = model.text_model(input_ids=input_ids).pooler_output
        text_embeds = model.text_projection(text_pooled)

        masked_pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        mask_diff = (masked_pooled - text_pooled).abs().max().item()
        print(f"text pooled, with vs without attention_mask: max abs diff {mask_diff:.3e}")
        assert mask_diff < 1e-6

        # get_image_features / get_text_features return BaseModelOutputWithPooling in 5.x
        feats_i = model.get_image_features(pixel_values=pixel_values).pooler_output
        feats_t = model.get_text_features(input_ids=input_ids).pooler_output
        assert torch.equal(feats_i, image_embeds) and torch.equal(feats_t, text_embeds)
        logits_per_image = model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image

        model.set_attn_implementation("eager")
        eager_i = model.get_image_features(pixel_values=pixel_values).pooler_output
        eager_t = model.get_text_features(input_ids=input_ids).pooler_output
        model.set_attn_implementation(attn_impl)
        print(f"{attn_impl} vs eager: image_embeds max abs diff {(eager_i - image_embeds).abs().max().item():.3e}, "
              f"text_embeds {(eager_t - text_embeds).abs().max().item():.3e}")

    tensors = {}
    for i, im in enumerate(images):
        tensors[f"pixel_values_{i}"] = np.ascontiguousarray(im["pixel_values"])
        tensors[f"pixel_u8_{i}"] = np.ascontiguousarray(im["pixel_u8"])
    tensors["image_pooled"] = image_pooled.numpy()
    tensors["image_embeds"] = image_embeds.numpy()
    tensors["input_ids"] = input_ids.numpy().astype(np.int64)
    tensors["attention_mask"] = attention_mask.numpy().astype(np.int64)
    tensors["text_pooled"] = text_pooled.numpy()
    tensors["text_embeds"] = text_embeds.numpy()
    tensors["logits_per_image"] = logits_per_image.numpy()
    save_file(tensors, str(out / "reference.safetensors"), metadata={"generator": "python/make_clip_fixture.py"})

    reference = {
        "generator": "python/make_clip_fixture.py",
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "torch": torch.__version__.split("+")[0],
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
        },
        "image_processor_class": "CLIPImageProcessorPil",
        "attn_implementation": attn_impl,
        "text_max_length": TEXT_MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "logit_scale": float(model.logit_scale.item()),
        "tensors_file": "reference.safetensors",
        "images": [
            {k: im[k] for k in ("file", "width", "height", "resized_width", "resized_height", "crop_top", "crop_left")}
            | {"pixel_values_key": f"pixel_values_{i}", "pixel_u8_key": f"pixel_u8_{i}",
               "image_embeds": to_list(image_embeds[i])}
            for i, im in enumerate(images)
        ],
        "texts": [
            {"text": text, "input_ids": to_list(input_ids[j]), "attention_mask": to_list(attention_mask[j]),
             "untruncated_length": untruncated[j], "eos_position": int(eos_pos[j]),
             "text_embeds": to_list(text_embeds[j])}
            for j, text in enumerate(TEST_TEXTS)
        ],
        "logits_per_image": to_list(logits_per_image),
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")

    print(f"first text {TEST_TEXTS[0]!r}: tokens {tokenizer.convert_ids_to_tokens(input_ids[0][: eos_pos[0] + 1])}")
    print(f"first text input_ids: {to_list(input_ids[0])}")
    print("outputs:")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(out)}  {path.stat().st_size} B  sha256 {sha256(path)[:16]}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
