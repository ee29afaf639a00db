#!/usr/bin/env bash
# Set up what the tests need (idempotent), make the generated fixtures, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
# Generated fixtures: the reference numbers come from the Python libraries themselves, each
# made again only when its script or the pinned requirements change.
fixture() {  # fixture DIR SCRIPT
  local dir=$1 script=$2 stamp
  stamp=$(sha256sum "$script" python/requirements.txt | sha256sum | cut -c1-16)
  if [[ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]]; then
    rm -rf "$dir"
    .venv/bin/python "$script" --out "$dir"
    echo "$stamp" > "$dir/.stamp"
  fi
}
fixture target/fixtures/clip-tiny python/make_clip_fixture.py          # HF transformers CLIP
fixture target/fixtures/diffusion python/make_diffusion_fixture.py     # HF diffusers schedulers
fixture target/fixtures/eval python/make_eval_fixture.py               # numpy/scipy FD, P/R, R-precision
fixture target/fixtures/image python/make_image_fixture.py             # Pillow resize and JPEG draft
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
# Each crate's lib.rs example (`--all-targets` leaves doctests out). rustdoc links them in a
# temporary directory, where the binaries' relative rpath cannot find libtorch.
LD_LIBRARY_PATH="$PWD/.libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --workspace --doc --no-fail-fast "$@" 2>&1 | tee -a "$LOG"
doc_status=${PIPESTATUS[0]}
(( status != 0 )) || status=$doc_status
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?/) p += $i; if ($(i+1) ~ /^failed;?/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$LOG"
exit "$status"
