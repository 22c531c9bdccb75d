#!/usr/bin/env bash
# `make e2e-vllm`: the sidecar against real vLLM on CPU (a prefiller and a decoder with
# NixlConnector and a CPU KV buffer, on 127.0.0.1), with a tiny model built offline.
#
#   1. setup.sh: the vLLM venv, outside the source tree, cached between runs
#   2. model.py: the tiny random-weight model (cached next to the venv)
#   3. cargo build --release --locked: the sidecar
#   4. both vLLM servers, each wrapped in `timeout`, loopback only
#   5. checks.py: P/D through the sidecar per connector and per API (completions, chat,
#      responses, messages, generate: the servers run --enable-scale-out for
#      /inference/v1/generate), streaming, client abort, decoder down after prefill, latency
#   6. everything started here is stopped (trap on exit), and that is verified
#
# Knobs (env): E2E_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/llm-d-sidecar-e2e),
#   E2E_LOGS (default $E2E_CACHE/logs, overwritten each run), PREFILL_PORT=18102,
#   DECODE_PORT=18101, PREFILL_SIDE_PORT=15601, DECODE_SIDE_PORT=15600, SERVER_TTL=1800,
#   START_TIMEOUT=420, E2E_LEASE=20 (the prefiller's KV lease in seconds, short so the
#   lease-expiry path can be measured), CHECKS_ARGS (extra checks.py flags, e.g. --skip-decoder-down).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export E2E_CACHE="${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-d-sidecar-e2e}"
LOGS="${E2E_LOGS:-$E2E_CACHE/logs}"
MODEL_DIR="$E2E_CACHE/tiny-model"
PREFILL_PORT="${PREFILL_PORT:-18102}"
DECODE_PORT="${DECODE_PORT:-18101}"
PREFILL_SIDE_PORT="${PREFILL_SIDE_PORT:-15601}"
DECODE_SIDE_PORT="${DECODE_SIDE_PORT:-15600}"
SERVER_TTL="${SERVER_TTL:-1800}"
START_TIMEOUT="${START_TIMEOUT:-420}"
E2E_LEASE="${E2E_LEASE:-20}"
CHECKS_ARGS="${CHECKS_ARGS:-}"

log() { echo "[e2e-vllm $(date +%H:%M:%S)] $*" >&2; }

group_pids() { ps -e -o pid=,pgid= | awk -v g="$1" '$2 == g { print $1 }'; }

# Proportional set size of a process group, in MB (RSS would count shared pages twice).
group_pss_mb() {
  local kb=0 p k
  for p in $(group_pids "$1"); do
    k=$(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || true)
    kb=$((kb + ${k:-0}))
  done
  echo $((kb / 1024))
}

declare -A PID=()

stop_server() { # name
  local name=$1 pid=${PID[$1]:-}
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    # $pid is `timeout`, which leads its own process group: TERM reaches the API server, which
    # shuts down its engine core and worker. KILL the group if that takes more than 30 s.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop within 30 s: killing its process group"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  # Its engine core and worker (same process group) may still be exiting: give them 15 s,
  # then KILL whatever is left of the group.
  for _ in $(seq 30); do [ -n "$(group_pids "$pid")" ] || break; sleep 0.5; done
  if [ -n "$(group_pids "$pid")" ]; then
    log "$name left processes behind: $(group_pids "$pid" | tr '\n' ' '); killing them"
    kill -KILL -- "-$pid" 2>/dev/null || true
    sleep 1
  fi
  unset "PID[$name]"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for name in "${!PID[@]}"; do stop_server "$name"; done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The whole run is one function, parsed before it starts: editing this file during a run
# cannot change what the run does.
main() {
  t_all=$SECONDS
  mkdir -p "$E2E_CACHE"
  rm -rf "$LOGS" && mkdir -p "$LOGS"
  FIG="$LOGS/figures.txt"
  : > "$FIG"

  for p in "$PREFILL_PORT" "$DECODE_PORT" "$PREFILL_SIDE_PORT" "$DECODE_SIDE_PORT"; do
    if port_busy "$p"; then log "port $p on 127.0.0.1 is already in use: set PREFILL_PORT/DECODE_PORT/..._SIDE_PORT"; exit 1; fi
  done

  # 1. venv
  t=$SECONDS
  VENV="$("$HERE/setup.sh")"
  echo "setup_s=$((SECONDS - t))" >> "$FIG"
  PY="$VENV/bin/python"

  # 2. model
  t=$SECONDS
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$HERE/model.py" "$MODEL_DIR" >&2
  echo "model_s=$((SECONDS - t))" >> "$FIG"

  # 3. sidecar
  t=$SECONDS
  log "building the sidecar (cargo build --release --locked)"
  (cd "$ROOT" && cargo build --release --locked --bin llm-d-routing-sidecar) >&2
  SIDECAR="$ROOT/target/release/llm-d-routing-sidecar"
  echo "build_s=$((SECONDS - t))" >> "$FIG"

  # 4. vLLM servers
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  # Loopback only: without these, vLLM and UCX also listen on the machine's other addresses.
  export VLLM_HOST_IP=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1
  export UCX_TLS=tcp,self UCX_NET_DEVICES=lo
  # vLLM's CPU default pins every server's OpenMP threads to the same core.
  export VLLM_CPU_OMP_THREADS_BIND=nobind
  # vLLM 0.32's AMX bf16 attention uses tile registers without asking Linux for them (only oneDNN GEMMs
  # over 4 tokens ask): a 1-token first step (a P/D decode) dies of SIGILL. Ask at start: one syscall.
  AMX_HOOK="$E2E_CACHE/amx-perm"
  mkdir -p "$AMX_HOOK"
  cat > "$AMX_HOOK/sitecustomize.py" <<'PY'
import ctypes, platform, sys
if sys.platform == "linux" and platform.machine() == "x86_64":
    ctypes.CDLL(None).syscall(158, 0x1023, 18)  # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
PY
  KV_CONFIG='{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}'
  # The prefiller's lease on KV blocks no decoder has pulled (vLLM 0.32 default 30 s).
  PREFILL_KV_CONFIG='{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu","kv_connector_extra_config":{"kv_lease_duration":'"$E2E_LEASE"'}}'

  start_server() { # name http_port side_channel_port kv_transfer_config
    local name=$1 port=$2 side=$3 kv=$4
    # vllm-cpu 0.32.0's `vllm` CLI looks up the wrong distribution name; the module works.
    PYTHONPATH="$AMX_HOOK${PYTHONPATH:+:$PYTHONPATH}" VLLM_NIXL_SIDE_CHANNEL_PORT="$side" timeout "$SERVER_TTL" \
      "$PY" -m vllm.entrypoints.openai.api_server \
        --model "$MODEL_DIR" --served-model-name tiny --host 127.0.0.1 --port "$port" \
        --max-model-len 512 -O0 --kv-cache-memory-bytes 67108864 \
        --enable-log-requests --enable-scale-out --kv-transfer-config "$kv" \
        > "$LOGS/$name.log" 2>&1 < /dev/null &
    PID[$name]=$!
    log "$name: pid ${PID[$name]}, http 127.0.0.1:$port, NIXL side channel 127.0.0.1:$side, log $LOGS/$name.log"
  }

  healthy() { curl -sf -m 2 "http://127.0.0.1:$1/health" >/dev/null 2>&1; }

  t=$SECONDS
  start_server prefill "$PREFILL_PORT" "$PREFILL_SIDE_PORT" "$PREFILL_KV_CONFIG"
  start_server decode "$DECODE_PORT" "$DECODE_SIDE_PORT" "$KV_CONFIG"
  until healthy "$PREFILL_PORT" && healthy "$DECODE_PORT"; do
    for name in prefill decode; do
      if ! kill -0 "${PID[$name]}" 2>/dev/null; then
        log "$name exited during startup; last lines of its log:"; tail -40 "$LOGS/$name.log" >&2; exit 1
      fi
    done
    if (( SECONDS - t > START_TIMEOUT )); then log "servers not healthy after $START_TIMEOUT s"; exit 1; fi
    sleep 1
  done
  echo "start_s=$((SECONDS - t))" >> "$FIG"
  log "both servers healthy after $((SECONDS - t)) s"
  echo "prefill_pss_mb=$(group_pss_mb "${PID[prefill]}") decode_pss_mb=$(group_pss_mb "${PID[decode]}")" >> "$FIG"

  # 5. checks
  t=$SECONDS
  set +e
  # shellcheck disable=SC2086
  python3 "$HERE/checks.py" --sidecar "$SIDECAR" --prefill "$PREFILL_PORT" --decode "$DECODE_PORT" \
    --logs "$LOGS" --lease "$E2E_LEASE" --figures "$LOGS/figures.json" $CHECKS_ARGS
  rc=$?
  set -e
  echo "checks_s=$((SECONDS - t))" >> "$FIG"

  # 6. stop, and check that nothing is left
  local stopped=1
  for name in prefill decode; do
    pid=${PID[$name]}
    stop_server "$name"
    if kill -0 "$pid" 2>/dev/null || [ -n "$(group_pids "$pid")" ]; then
      log "FAIL: $name (pid $pid) still has processes"; rc=1; stopped=0
    fi
  done
  for p in "$PREFILL_PORT" "$DECODE_PORT" "$PREFILL_SIDE_PORT" "$DECODE_SIDE_PORT"; do
    if port_busy "$p"; then log "FAIL: something still listens on 127.0.0.1:$p"; rc=1; stopped=0; fi
  done
  if [ "$stopped" = 1 ]; then log "both servers stopped, ports free"; fi
  echo "total_s=$((SECONDS - t_all))" >> "$FIG"
  log "figures: $(tr '\n' ' ' < "$FIG"); logs in $LOGS"
  return "$rc"
}

main "$@"
exit $?
