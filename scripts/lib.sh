# shellcheck shell=bash
# Shared by demo.sh, soak.sh and bench.sh: a scratch directory whose processes are stopped on
# exit, and (demo, soak) the simulator and the sidecar on free loopback ports. The caller sets
# BIN (where the binaries are) and calls init_scratch first. Functions run in the caller's
# shell (never in $(...)), so every PID they start reaches PIDS and is stopped.

# init_scratch: sets WORK (a scratch directory), PIDS=() and PID_FILES=(); on exit, every PID
# in PIDS, and the one in each file of PID_FILES (processes started by a child, such as the
# simulators the chaos soak restarts), is stopped and WORK removed. INT and TERM exit with 130,
# through the same cleanup.
init_scratch() {
    WORK=$(mktemp -d)
    PIDS=()
    PID_FILES=()
    trap stop_scratch EXIT
    trap 'exit 130' INT TERM
}

stop_scratch() {
    local pid file _
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for file in "${PID_FILES[@]}"; do
        [ -f "$file" ] || continue
        pid=$(cat "$file")
        kill "$pid" 2>/dev/null || continue
        # Not our child, so no `wait`: poll until it is gone (at most 5 s).
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    done
    rm -rf "$WORK"
}

# start_sim VAR NAME [ARGS...]: vllm-sim NAME on a free port; its API port goes into VAR.
start_sim() {
    local var=$1 name=$2 _
    shift 2
    "$BIN/vllm-sim" --port 0 --engine-id "$name-engine" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    PIDS+=($!)
    for _ in $(seq 200); do
        if grep -q '"event":"listening"' "$WORK/$name.out" 2>/dev/null; then
            printf -v "$var" '%s' "$(python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["port"])' <"$WORK/$name.out")"
            return 0
        fi
        sleep 0.05
    done
    echo "vllm-sim ($name) did not start:" >&2
    cat "$WORK/$name.log" >&2
    return 1
}

# listening_port FILE [FIELD]: the "port" (or FIELD, e.g. side_channel_port) of the
# {"event":"listening",...} line a sidecar or vllm-sim prints on stdout once it accepts
# connections; empty until then.
listening_port() {
    python3 -c '
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        event = json.loads(line)
    except ValueError:
        continue
    if isinstance(event, dict) and event.get("event") == "listening":
        print(event[sys.argv[2]])
        break
' "$1" "${2:-port}" 2>/dev/null || true
}

# start_sidecar [ARGS...]: the sidecar on a free loopback port (no admin listener);
# sets SIDECAR (its port) and SIDECAR_PID.
start_sidecar() {
    local _
    "$BIN/llm-d-routing-sidecar" -port=0 -bind-address=127.0.0.1 -vllm-host=127.0.0.1 \
        -metrics-port=0 "$@" >"$WORK/sidecar.out" 2>"$WORK/sidecar.log" &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
    SIDECAR=""
    for _ in $(seq 200); do
        SIDECAR=$(listening_port "$WORK/sidecar.out")
        [ -n "$SIDECAR" ] && return 0
        sleep 0.05
    done
    echo "sidecar did not start:" >&2
    cat "$WORK/sidecar.log" >&2
    return 1
}
