#!/usr/bin/env bash
# Set up (idempotent), build, and run the main job on the embedded default: the ~3,800 Noto
# emoji of npm's emoji-datasource-google, embedded into runs/stickers/embeddings.lance, then
# indexed (build-index) and given their 10 nearest neighbours each (precompute-knn, into
# runs/stickers/embeddings-knn.lance), a small kNN-conditioned diffusion model trained on them
# by two data-parallel processes on this machine (runs/stickers/train/), and two prompts sampled from it (runs/stickers/samples.png and
# runs/stickers/samples-neighbours.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --bin knn-diffusion
./target/debug/knn-diffusion embed --config configs/stickers.toml "$@"
./target/debug/knn-diffusion build-index --config configs/stickers.toml "$@"
./target/debug/knn-diffusion precompute-knn --config configs/stickers.toml "$@"
./target/debug/knn-diffusion launch --nproc-per-node 2 -- train --config configs/stickers.toml "$@"
./target/debug/knn-diffusion sample --config configs/stickers.toml "$@" \
  --prompt "a red heart" --prompt "a smiling cat" --out runs/stickers/samples.png
