#!/usr/bin/env bash
# `make e2e-vllm`: the sidecar against real vLLM on CPU, one prefiller + decoder pair per KV
# connector that vLLM runs on CPU, one pair at a time, all on 127.0.0.1, with a tiny model
# built offline.
#
#   1. setup.sh: the vLLM venv, outside the source tree, cached between runs
#   2. model.py: the tiny random-weight model (cached next to the venv)
#   3. cargo build --release --locked: the sidecar
#   4. per pair: its servers (each wrapped in `timeout`), its checks, then everything stopped
#      and the ports checked free:
#      nixl-pull   NixlConnector, sidecar nixlv2 (nixl_checks.py --mode pull: every API, streaming,
#                  concurrency, a client leaving mid-stream and mid-prefill, tokenize-once,
#                  legacy nixl, decoder down after prefill, latency)
#      nixl-push   NixlPushConnector, sidecar nixlv2 unchanged (nixl_checks.py --mode push)
#      example     ExampleConnector (a shared directory), sidecar lmcache (store_checks.py)
#      lmcache-mp  LMCacheMPConnector + LMCache's MP server, sidecar lmcache; opt-in
#                  (E2E_LMCACHE=1): its own venv (lmcache-setup.sh, ~80 s and ~7 GB once)
#   5. a total line; everything started here is stopped (trap on exit), and that is verified
#
# Knobs (env): E2E_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/llm-d-sidecar-e2e),
#   E2E_LOGS (default $E2E_CACHE/logs, overwritten each run; one directory per pair),
#   E2E_PAIRS (default "nixl-pull nixl-push example", plus lmcache-mp with E2E_LMCACHE=1),
#   PREFILL_PORT=18102, DECODE_PORT=18101, PREFILL_SIDE_PORT=15601, DECODE_SIDE_PORT=15600,
#   LMCACHE_PORT=18250, LMCACHE_ADMIN_PORT=18251, SERVER_TTL=1800, START_TIMEOUT=420,
#   E2E_LEASE=20 (the NIXL prefiller's KV lease in seconds, short so the lease-expiry path can
#   be measured), CHECKS_ARGS (extra nixl_checks.py flags for nixl-pull, e.g. --skip-decoder-down).
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
LMCACHE_PORT="${LMCACHE_PORT:-18250}"
LMCACHE_ADMIN_PORT="${LMCACHE_ADMIN_PORT:-18251}"
DEFAULT_PAIRS="nixl-pull nixl-push example"
if [ "${E2E_LMCACHE:-0}" != 0 ]; then DEFAULT_PAIRS="$DEFAULT_PAIRS lmcache-mp"; fi
E2E_PAIRS="${E2E_PAIRS:-$DEFAULT_PAIRS}"
PORTS=("$PREFILL_PORT" "$DECODE_PORT" "$PREFILL_SIDE_PORT" "$DECODE_SIDE_PORT" "$LMCACHE_PORT" "$LMCACHE_ADMIN_PORT")

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

  for p in "${PORTS[@]}"; do
    if port_busy "$p"; then log "port $p on 127.0.0.1 is already in use: set PREFILL_PORT/DECODE_PORT/..._SIDE_PORT/LMCACHE_*"; exit 1; fi
  done

  # 1. venv
  t=$SECONDS
  VENV="$("$HERE/setup.sh")"
  if [[ " $E2E_PAIRS " == *" lmcache-mp "* ]]; then LMC_VENV="$("$HERE/lmcache-setup.sh")"; fi
  echo "setup_s=$((SECONDS - t))" >> "$FIG"

  # 2. model
  t=$SECONDS
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" "$HERE/model.py" "$MODEL_DIR" >&2
  echo "model_s=$((SECONDS - t))" >> "$FIG"

  # 3. sidecar
  t=$SECONDS
  log "building the sidecar (cargo build --release --locked)"
  (cd "$ROOT" && cargo build --release --locked --bin llm-d-routing-sidecar) >&2
  SIDECAR="$ROOT/target/release/llm-d-routing-sidecar"
  echo "build_s=$((SECONDS - t))" >> "$FIG"

  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  # LMCache reports usage by default (once at start, then every 600 s): off.
  export LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1
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

  local rc=0 pair
  for pair in $E2E_PAIRS; do
    run_pair "$pair" || rc=1
  done
  awk '/^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$/ { p += $1; f += $3; s += $5 }
       END { printf "all pairs: %d passed, %d failed, %d skipped\n", p, f, s }' "$LOGS"/*/checks.out
  echo "total_s=$((SECONDS - t_all))" >> "$FIG"
  log "figures: $(tr '\n' ' ' < "$FIG"); logs in $LOGS"
  return "$rc"
}

start_vllm() { # name http_port side_channel_port python kv_transfer_config [vLLM args...]
  local name=$1 port=$2 side=$3 py=$4 kv=$5
  shift 5
  # vllm-cpu 0.32.0's `vllm` CLI looks up the wrong distribution name; the module works.
  PYTHONPATH="$AMX_HOOK${PYTHONPATH:+:$PYTHONPATH}" VLLM_NIXL_SIDE_CHANNEL_PORT="$side" timeout "$SERVER_TTL" \
    "$py" -m vllm.entrypoints.openai.api_server \
      --model "$MODEL_DIR" --served-model-name tiny --host 127.0.0.1 --port "$port" \
      -O0 --kv-cache-memory-bytes 67108864 --enable-log-requests --kv-transfer-config "$kv" "$@" \
      > "$PAIR_LOGS/$name.log" 2>&1 < /dev/null &
  PID[$name]=$!
  log "$name: pid ${PID[$name]}, http 127.0.0.1:$port, log $PAIR_LOGS/$name.log"
}

healthy() { curl -sf -m 2 "http://127.0.0.1:$1$2" >/dev/null 2>&1; }

wait_up() { # path name:port...
  local path=$1 t=$SECONDS np
  shift
  for np in "$@"; do
    until healthy "${np#*:}" "$path"; do
      if ! kill -0 "${PID[${np%%:*}]}" 2>/dev/null; then
        log "${np%%:*} exited during startup; last lines of its log:"; tail -40 "$PAIR_LOGS/${np%%:*}.log" >&2; return 1
      fi
      if (( SECONDS - t > START_TIMEOUT )); then log "${np%%:*} not up after $START_TIMEOUT s"; return 1; fi
      sleep 1
    done
  done
}

# One pair: start its servers, wait for them, run its checks, stop everything, check the ports.
run_pair() { # pair
  local pair=$1 t=$SECONDS rc=0 py="$VENV/bin/python" kv kv_prefill checks names=(prefill decode)
  PAIR_LOGS="$LOGS/$pair"
  mkdir -p "$PAIR_LOGS"
  log "pair $pair"
  case "$pair" in
    nixl-pull)
      kv='{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}'
      # The prefiller's lease on KV blocks no decoder has pulled (vLLM 0.32 default 30 s).
      kv_prefill='{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu","kv_connector_extra_config":{"kv_lease_duration":'"$E2E_LEASE"'}}'
      # A 2048 context for the long prompt a client leaves during, prefilled 256 tokens a step
      # so that the abort lands mid-prefill; --enable-scale-out serves /inference/v1/generate.
      start_vllm prefill "$PREFILL_PORT" "$PREFILL_SIDE_PORT" "$py" "$kv_prefill" \
        --max-model-len 2048 --max-num-batched-tokens 256 --enable-scale-out
      start_vllm decode "$DECODE_PORT" "$DECODE_SIDE_PORT" "$py" "$kv" --max-model-len 2048 --enable-scale-out
      # shellcheck disable=SC2206
      checks=(nixl_checks.py --mode pull --lease "$E2E_LEASE" --figures "$PAIR_LOGS/figures.json" $CHECKS_ARGS)
      ;;
    nixl-push)
      kv='{"kv_connector":"NixlPushConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}'
      # Prefix caching off: the plain reference of a multi-block prompt must recompute it.
      for n in prefill:$PREFILL_PORT:$PREFILL_SIDE_PORT decode:$DECODE_PORT:$DECODE_SIDE_PORT; do
        IFS=: read -r name port side <<< "$n"
        start_vllm "$name" "$port" "$side" "$py" "$kv" --max-model-len 512 --no-enable-prefix-caching
      done
      checks=(nixl_checks.py --mode push)
      ;;
    example)
      local store="$PAIR_LOGS/store"
      mkdir -p "$store"
      kv='{"kv_connector":"ExampleConnector","kv_role":"kv_both","kv_connector_extra_config":{"shared_storage_path":"'"$store"'"}}'
      # ExampleConnector saves a request's blocks in the step that first schedules it: with
      # chunked prefill (vLLM's default) a prompt split across steps is stored incomplete and a
      # decoder loading it answers wrong. Prefix caching off: the store is the only reuse path.
      for n in prefill:$PREFILL_PORT decode:$DECODE_PORT; do
        start_vllm "${n%%:*}" "${n#*:}" 0 "$py" "$kv" --max-model-len 512 \
          --no-enable-prefix-caching --no-enable-chunked-prefill
      done
      checks=(store_checks.py --store example --dir "$store")
      ;;
    lmcache-mp)
      py="$LMC_VENV/bin/python"
      local shm="lmcache_sidecar_e2e_$$"
      # LMCache's server: zmq on LMCACHE_PORT, admin HTTP on LMCACHE_ADMIN_PORT, a 1 GiB L1 in
      # CPU memory; CPU workers reach it by the engine-driven path over a shared-memory segment.
      timeout "$SERVER_TTL" "$py" -m lmcache.v1.multiprocess.http_server \
        --host 127.0.0.1 --port "$LMCACHE_PORT" --http-host 127.0.0.1 --http-port "$LMCACHE_ADMIN_PORT" \
        --l1-size-gb 1 --l1-init-size-gb 1 --eviction-policy LRU --chunk-size 256 \
        --supported-transfer-mode auto --shm-name "$shm" > "$PAIR_LOGS/lmcache-server.log" 2>&1 < /dev/null &
      PID[lmcache]=$!
      names=(prefill decode lmcache)
      log "lmcache: pid ${PID[lmcache]}, zmq 127.0.0.1:$LMCACHE_PORT, admin http 127.0.0.1:$LMCACHE_ADMIN_PORT"
      wait_up /healthcheck "lmcache:$LMCACHE_ADMIN_PORT" || rc=1
      kv='{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both","kv_connector_extra_config":{"lmcache.mp.host":"tcp://127.0.0.1","lmcache.mp.port":'"$LMCACHE_PORT"'}}'
      for n in prefill:$PREFILL_PORT decode:$DECODE_PORT; do
        start_vllm "${n%%:*}" "${n#*:}" 0 "$py" "$kv" --max-model-len 512 --no-enable-prefix-caching
      done
      checks=(store_checks.py --store lmcache-mp --lmcache-admin "$LMCACHE_ADMIN_PORT")
      ;;
    *) log "unknown pair $pair (E2E_PAIRS: nixl-pull nixl-push example lmcache-mp)"; return 1 ;;
  esac
  if [ "$rc" = 0 ] && wait_up /health "prefill:$PREFILL_PORT" "decode:$DECODE_PORT"; then
    echo "$pair start_s=$((SECONDS - t)) prefill_pss_mb=$(group_pss_mb "${PID[prefill]}") decode_pss_mb=$(group_pss_mb "${PID[decode]}")" >> "$FIG"
    log "$pair: servers healthy after $((SECONDS - t)) s"
    local tc=$SECONDS
    set +e
    python3 "$HERE/${checks[0]}" "${checks[@]:1}" --sidecar "$SIDECAR" --prefill "$PREFILL_PORT" \
      --decode "$DECODE_PORT" --logs "$PAIR_LOGS" | tee "$PAIR_LOGS/checks.out"
    rc=${PIPESTATUS[0]}
    set -e
    echo "$pair checks_s=$((SECONDS - tc))" >> "$FIG"
  else
    echo "0 passed, 1 failed, 0 skipped" > "$PAIR_LOGS/checks.out"
    rc=1
  fi

  # Stop the vLLM servers before their store; then nothing may be left.
  local name pid
  for name in "${names[@]}"; do
    pid=${PID[$name]:-}
    [ -n "$pid" ] || continue
    stop_server "$name"
    if kill -0 "$pid" 2>/dev/null || [ -n "$(group_pids "$pid")" ]; then
      log "FAIL: $name (pid $pid) still has processes"; rc=1
    fi
  done
  for p in "${PORTS[@]}"; do
    if port_busy "$p"; then log "FAIL: something still listens on 127.0.0.1:$p"; rc=1; fi
  done
  if [ "$pair" = lmcache-mp ] && ls /dev/shm 2>/dev/null | grep -q "lmcache_sidecar_e2e_$$"; then
    log "FAIL: LMCache's shared memory segment left in /dev/shm"; rc=1
  fi
  echo "$pair total_s=$((SECONDS - t))" >> "$FIG"
  log "$pair: done in $((SECONDS - t)) s (rc $rc), servers stopped"
  return "$rc"
}

main "$@"
exit $?
