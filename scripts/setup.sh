#!/usr/bin/env bash
# One-time set-up of everything a fresh machine lacks, each step skipped when already done:
#   protoc (Lance's build), a project venv with PyPI's torch==2.13.0 (the libtorch tch 0.26
#   links) and python/requirements.txt, the .libtorch link the build and the binaries use,
#   and the embedded default dataset (npm emoji-datasource-google@16.0.0 → data/emoji-google/);
#   Debian's fonts-dejavu-core for `bench plot`'s text.
# With --tests, also the test tools: s3s-fs (an S3 server for loopback tests).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FOR_TESTS=0
[[ "${1:-}" == "--tests" ]] && FOR_TESTS=1

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------------------
need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v npm >/dev/null || need_apt+=(npm)
# `bench plot` draws its text in DejaVu Sans.
[[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || need_apt+=(fonts-dejavu-core)
if ((${#need_apt[@]})); then
  say "installing ${need_apt[*]} (Debian)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- python venv with torch ------------------------------------------------------------
TORCH_VERSION=2.13.0
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "installing torch==$TORCH_VERSION into .venv (about 1 minute)"
  .venv/bin/pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
REQ_STAMP=.venv/.requirements.sha
REQ_SHA=$(sha256sum python/requirements.txt | cut -d' ' -f1)
if [[ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$REQ_SHA" ]]; then
  say "installing python/requirements.txt"
  .venv/bin/pip install -q --disable-pip-version-check -r python/requirements.txt
  echo "$REQ_SHA" > "$REQ_STAMP"
fi
TORCH_DIR=$(.venv/bin/python -c "import os,torch; print(os.path.dirname(torch.__file__))")
if [[ "$(readlink .libtorch 2>/dev/null)" != "$TORCH_DIR" ]]; then
  ln -sfn "$TORCH_DIR" .libtorch
fi
# cudarc's NCCL loader looks for libnccl.so; the wheel ships only libnccl.so.2.
NCCL_DIR=$(.venv/bin/python -c "import os,nvidia.nccl as n; print(os.path.join(list(n.__path__)[0],'lib'))" 2>/dev/null || true)
# Link it beside libtorch, whose lib/ is already on the binaries' run path (.cargo/config.toml).
if [[ -n "$NCCL_DIR" && -e "$NCCL_DIR/libnccl.so.2" && ! -e "$TORCH_DIR/lib/libnccl.so" ]]; then
  ln -s "$NCCL_DIR/libnccl.so.2" "$TORCH_DIR/lib/libnccl.so"
fi

# --- embedded default dataset ------------------------------------------------------------
EMOJI_PKG=emoji-datasource-google@16.0.0
if [[ ! -f data/emoji-google/.complete ]]; then
  say "fetching $EMOJI_PKG (npm registry) into data/emoji-google/"
  mkdir -p .cache/npm data
  tgz=$(cd .cache/npm && ls emoji-datasource-google-16.0.0.tgz 2>/dev/null || npm pack --silent "$EMOJI_PKG")
  rm -rf data/emoji-google .cache/npm/package
  tar -xzf ".cache/npm/$tgz" -C .cache/npm package/img/google/64 package/emoji.json
  mkdir -p data/emoji-google/images
  mv .cache/npm/package/img/google/64/*.png data/emoji-google/images/
  mv .cache/npm/package/emoji.json data/emoji-google/emoji.json
  rm -rf .cache/npm/package
  touch data/emoji-google/.complete
fi

# --- test tools -------------------------------------------------------------------------
if ((FOR_TESTS)); then
  if [[ ! -x .tools/bin/s3s-fs ]]; then
    say "installing s3s-fs 0.14.1 (S3 server for loopback tests; about 3.5 minutes)"
    cargo install -q s3s-fs@0.14.1 --features binary --locked --root "$ROOT/.tools"
  fi
fi
say "ready"
