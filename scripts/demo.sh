#!/usr/bin/env bash
# Set up (idempotent), build, and run the main job on the embedded default, text to image
# with nothing downloaded but packages:
#   1. `data fetch all`: captioned emoji and clip art that ship in npm and Debian packages
#      (Twemoji, OpenMoji, Openclipart, Fluent 3D) as img2dataset parquet under data/captioned/;
#   2. `train-clip`: the project's own small CLIP on them (runs/clip/model), and the judge
#      CLIP (another seed and held-out split, runs/clip-judge/model) that scores the samples;
#      a rerun finds both trained and only re-exports them;
#   3. the ~3,800 Noto emoji of npm's emoji-datasource-google (image-only), embedded with that
#      CLIP into runs/stickers/embeddings.lance, indexed, and given their 10 nearest
#      neighbours each (runs/stickers/embeddings-knn.lance);
#   4. a small kNN-conditioned diffusion model trained on them by two data-parallel
#      processes (runs/stickers/train/);
#   5. two prompts sampled (runs/stickers/samples.png, runs/stickers/samples-neighbours.png)
#      and read by the judge CLIP: the share of samples nearest their own prompt is printed.
# Extra arguments (e.g. `--set train.max_steps=3000`) go to every stage after the fetch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --bin knn-diffusion
BIN=./target/debug/knn-diffusion
CFG=configs/stickers.toml
$BIN data fetch all
$BIN train-clip --config $CFG "$@"
$BIN train-clip --config $CFG --judge "$@"
$BIN embed --config $CFG "$@"
$BIN build-index --config $CFG "$@"
$BIN precompute-knn --config $CFG "$@"
$BIN launch --nproc-per-node 2 -- train --config $CFG "$@"
$BIN sample --config $CFG "$@" \
  --prompt "a red heart" --prompt "a smiling cat" --per-prompt 8 \
  --judge-clip runs/clip-judge/model --out runs/stickers/samples.png \
  --summary-json runs/stickers/samples.json
