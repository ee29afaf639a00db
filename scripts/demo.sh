#!/usr/bin/env bash
# Set up (idempotent), build, and run the main job on the embedded default: the ~3,800 Noto
# emoji of npm's emoji-datasource-google, embedded into runs/stickers/embeddings.lance.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --bin knn-diffusion
./target/debug/knn-diffusion embed --config configs/stickers.toml "$@"
