#!/usr/bin/env bash
# Set up what the tests need (idempotent), make the generated fixtures, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
# The CLIP parity fixture comes from HF transformers (python/make_clip_fixture.py).
FIX=target/fixtures/clip-tiny
STAMP=$(sha256sum python/make_clip_fixture.py python/requirements.txt | sha256sum | cut -c1-16)
if [[ "$(cat $FIX/.stamp 2>/dev/null)" != "$STAMP" ]]; then
  rm -rf "$FIX"
  .venv/bin/python python/make_clip_fixture.py --out "$FIX"
  echo "$STAMP" > "$FIX/.stamp"
fi
# The diffusion schedule/sampler parity fixture comes from HF diffusers
# (python/make_diffusion_fixture.py).
FIX=target/fixtures/diffusion
STAMP=$(sha256sum python/make_diffusion_fixture.py python/requirements.txt | sha256sum | cut -c1-16)
if [[ "$(cat $FIX/.stamp 2>/dev/null)" != "$STAMP" ]]; then
  rm -rf "$FIX"
  .venv/bin/python python/make_diffusion_fixture.py --out "$FIX"
  echo "$STAMP" > "$FIX/.stamp"
fi
# A one-node Slurm on 127.0.0.1 for the job-submission tests (stopped when the tests end).
if bash scripts/slurm.sh start; then
  export SLURM_CONF="$PWD/target/slurm/slurm.conf"
  trap 'bash scripts/slurm.sh stop' EXIT
else
  echo "warning: no loopback Slurm; its test is skipped here (in CI it fails)" >&2
fi
LOG=target/test-output.log
set +e
cargo test --workspace --all-targets "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?/) p += $i; if ($(i+1) ~ /^failed;?/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$LOG"
exit "$status"
