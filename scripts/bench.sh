#!/usr/bin/env bash
# `make bench`: the sidecar against the direct baseline, measured in the same run.
#
# Starts two fake vLLM workers (decoder and prefiller, from ../shared/bench/fakevllm) on
# loopback, the sidecar in front of the decoder, and runs each scenario twice with the `pdload`
# load generator: once straight to the decoder ("direct") and once through the sidecar. The
# sidecar is pinned to one core (taskset -c 1), everything else to the other (taskset -c 0).
# Every run is bounded by a request count and by MAX_SECS. Prints a table and writes it to
# $BENCH_OUT (default target/bench/results.md). Everything started here is killed by PID on exit.
#
# Knobs (environment):
#   MAX_SECS=10          upper bound of each measured run, in seconds
#   SIDECAR_ARGS=""      extra sidecar flags, e.g. "-worker-threads=1"
#   SIDECAR_BIN          a prebuilt sidecar binary (skips `cargo build`)
#   BENCH_TOOLS_DIR      where fakevllm's crate is (default ../shared/bench/fakevllm)
#   BENCH_TOOLS_TARGET   its cargo target dir (default ~/.cache/sidecar-bench)
#   SIDECAR_CPU / LOAD_CPU   the cores to pin to (default 1 and 0)
#   IDLE_STREAMS=1000    open streams for the memory scenario
#   REPEAT=3             runs per scenario and side (alternating); the table shows medians
#   BUSY_POLL=200us      -busy-poll window of the second sidecar used by pd_c1_busy
#   ONLY="pd_c1 ..."     run only these scenarios
#   PACED_STREAMS=512    concurrent streams of the paced scenario (64 events 20 ms apart)
#   NGINX=nginx          the one-hop reference (Debian: apt-get install nginx-light); runs
#                        without it when it is not installed (NGINX= to turn it off)
#   VALGRIND=valgrind    counts the sidecar's instructions per request under callgrind (the
#                        `instructions` scenario: the same count run after run, so A/B
#                        comparisons need no repeats); VALGRIND= to skip it
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MAX_SECS=${MAX_SECS:-10}
SIDECAR_ARGS=${SIDECAR_ARGS:-}
IDLE_STREAMS=${IDLE_STREAMS:-1000}
SIDECAR_CPU=${SIDECAR_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
BENCH_OUT=${BENCH_OUT:-$REPO/target/bench/results.md}
TOOLS_DIR=${BENCH_TOOLS_DIR:-$REPO/../shared/bench/fakevllm}
TOOLS_TARGET=${BENCH_TOOLS_TARGET:-${HOME:-/tmp}/.cache/sidecar-bench}
ONLY=${ONLY:-}
REPEAT=${REPEAT:-3}
BUSY_POLL=${BUSY_POLL:-200us}
PACED_STREAMS=${PACED_STREAMS:-512}
NGINX=${NGINX-nginx}
VALGRIND=${VALGRIND-valgrind}

die() { echo "bench: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 is required (free ports, tables)"
command -v curl >/dev/null || die "curl is required (readiness checks)"

if [ ! -f "$TOOLS_DIR/Cargo.toml" ]; then
    cat >&2 <<EOF
bench: the load tools are missing: $TOOLS_DIR/Cargo.toml not found.

This benchmark uses two small programs that are not part of this repository:
  - fakevllm: a fake vLLM OpenAI server (JSON completions, SSE streams, P/D prefill answers
    with kv_transfer_params when the request has kv_transfer_params.do_remote_decode=true);
  - pdload:   a bounded HTTP/1.1 load generator printing one JSON line with ok, rps,
    lat_p50_ms, lat_p99_ms, ttfb_p50_ms (it must check that SSE streams end with [DONE]).
Point BENCH_TOOLS_DIR at a cargo crate providing both binaries (the llm-d bench tools in
shared/bench/fakevllm), e.g.  BENCH_TOOLS_DIR=/path/to/fakevllm make bench
EOF
    exit 2
fi

# --- build -----------------------------------------------------------------------------------
if [ -z "${SIDECAR_BIN:-}" ]; then
    echo "building the sidecar (release)..." >&2
    cargo build --release --locked --bin llm-d-routing-sidecar >&2
    SIDECAR_BIN=$REPO/target/release/llm-d-routing-sidecar
fi
echo "building fakevllm and pdload into $TOOLS_TARGET..." >&2
CARGO_TARGET_DIR=$TOOLS_TARGET cargo build --release --manifest-path "$TOOLS_DIR/Cargo.toml" >&2
FAKEVLLM=$TOOLS_TARGET/release/fakevllm
PDLOAD=$TOOLS_TARGET/release/pdload

# --- processes -------------------------------------------------------------------------------
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
init_scratch

PIN_SIDECAR=()
PIN_LOAD=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    PIN_SIDECAR=(taskset -c "$SIDECAR_CPU")
    PIN_LOAD=(taskset -c "$LOAD_CPU")
else
    echo "bench: taskset or a second core missing: processes are not pinned" >&2
fi
# 1,000 idle streams need ~3 descriptors each in the sidecar (client, decoder, prefiller).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Free loopback ports, checked by binding them (fakevllm needs fixed addresses).
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

wait_http() { # url what
    for _ in $(seq 200); do
        curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    die "$2 did not come up at $1"
}

# start_fake NAME ARGS...: starts fakevllm pinned to the load core.
start_fake() {
    local name=$1; shift
    "${PIN_LOAD[@]}" "$FAKEVLLM" --threads 1 "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}

# start_bench_sidecar NAME DECODER_PORT: starts the sidecar on a free port; sets SC_PORT and SC_PID.
start_bench_sidecar() {
    local name=$1 dport=$2
    # shellcheck disable=SC2086
    "${PIN_SIDECAR[@]}" "$SIDECAR_BIN" -port=0 -bind-address=127.0.0.1 -vllm-host=127.0.0.1 \
        -vllm-port="$dport" -metrics-port=0 $SIDECAR_ARGS >"$WORK/$name.out" 2>"$WORK/$name.log" &
    SC_PID=$!
    PIDS+=("$SC_PID")
    SC_PORT=""
    for _ in $(seq 200); do
        SC_PORT=$(listening_port "$WORK/$name.out")
        [ -n "$SC_PORT" ] && break
        kill -0 "$SC_PID" 2>/dev/null || break
        sleep 0.05
    done
    [ -n "$SC_PORT" ] || { cat "$WORK/$name.log" >&2; die "the sidecar did not start"; }
    wait_http "http://127.0.0.1:$SC_PORT/health" "the sidecar"
}

read -r DEC_PORT PRE_PORT SLOW_PORT <<<"$(free_ports 3)"
start_fake fake --listen "127.0.0.1:$DEC_PORT" --prefill-listen "127.0.0.1:$PRE_PORT"
wait_http "http://127.0.0.1:$DEC_PORT/health" "fakevllm (decoder)"
wait_http "http://127.0.0.1:$PRE_PORT/health" "fakevllm (prefiller)"
start_bench_sidecar sidecar "$DEC_PORT"
SIDECAR_PID=$SC_PID
SIDECAR_PORT=$SC_PORT
# A second sidecar with busy polling, for the low-load latency scenario (idle otherwise).
SIDECAR_ARGS="$SIDECAR_ARGS -busy-poll=$BUSY_POLL" start_bench_sidecar sidecar-busy "$DEC_PORT"
BUSY_PID=$SC_PID
BUSY_PORT=$SC_PORT

# nginx, one hop in front of the same decoder, pinned like the sidecar: one worker process,
# keep-alive to the decoder, no buffering either way (as the sidecar streams).
NGINX_PID=""
start_nginx() { # NAME DECODER_PORT: sets NG_PORT and NG_PID (the worker's, whose CPU is counted)
    local name=$1 dport=$2 conf
    NG_PORT=$(free_ports 1)
    mkdir -p "$WORK/$name"
    conf=$WORK/$name/nginx.conf
    cat >"$conf" <<NGX
worker_processes 1;
daemon off;
pid $WORK/$name/nginx.pid;
error_log $WORK/$name/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/$name/body;
    proxy_temp_path $WORK/$name/proxy;
    fastcgi_temp_path $WORK/$name/fcgi;
    uwsgi_temp_path $WORK/$name/uwsgi;
    scgi_temp_path $WORK/$name/scgi;
    client_max_body_size 32m;
    client_body_buffer_size 1m;
    upstream decoder { server 127.0.0.1:$dport; keepalive 256; }
    server {
        listen 127.0.0.1:$NG_PORT backlog=4096;
        location / {
            proxy_pass http://decoder;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 60s;
        }
    }
}
NGX
    "${PIN_SIDECAR[@]}" "$NGINX_BIN" -e "$WORK/$name/error.log" -c "$conf" >"$WORK/$name/out.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$NG_PORT/health" "nginx"
    NG_PID=$(pgrep -P "$(cat "$WORK/$name/nginx.pid")" | head -1)
    [ -n "$NG_PID" ] || die "nginx started no worker process"
}
NGINX_BIN=$(command -v "${NGINX:-none}" 2>/dev/null || true)
if [ -z "$NGINX_BIN" ] && [ -x /usr/sbin/nginx ] && [ -n "$NGINX" ]; then NGINX_BIN=/usr/sbin/nginx; fi
if [ -n "$NGINX_BIN" ]; then
    start_nginx nginx "$DEC_PORT"
    NGINX_PID=$NG_PID
    NGINX_URL=http://127.0.0.1:$NG_PORT/v1/completions
    echo "nginx reference: $("$NGINX_BIN" -v 2>&1) on 127.0.0.1:$NG_PORT" >&2
else
    echo "bench: no nginx (Debian: apt-get install nginx-light): the one-hop reference column stays empty" >&2
fi

# --- bodies ----------------------------------------------------------------------------------
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
prompt = ("The quick brown fox jumps over the lazy dog. " * 23)[:1000]
def put(name, **kw):
    open(f"{w}/{name}.json", "w").write(json.dumps({"model": "fake-model", "prompt": prompt, **kw}))
put("small", max_tokens=16)
put("stream", max_tokens=64, stream=True)
put("idle", max_tokens=2, stream=True)
# Paced: 64 events 20 ms apart (fakevllm reads fake_token_delay_ms from the body).
put("paced", max_tokens=64, stream=True, fake_token_delay_ms=20)
# A multimodal-sized request: 20 MiB of JSON (inline images are base64 strings like this).
huge = {"model": "fake-model", "prompt": "x" * (20 * 1024 * 1024 - 64), "max_tokens": 16}
open(f"{w}/big20m.json", "w").write(json.dumps(huge))
big = {"model": "fake-model", "prompt": ("lorem ipsum dolor sit amet " * 16000)[:400_000], "max_tokens": 16}
open(f"{w}/big.json", "w").write(json.dumps(big))
PY

# --- measurement -----------------------------------------------------------------------------
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# load SCENARIO SIDE URL BODY N C [pdload args...]: one bounded run; appends a JSON line.
# The table takes the median of the REPEAT runs of each scenario and side.
load() {
    local scenario=$1 side=$2 url=$3 body=$4 n=$5 c=$6; shift 6
    local t0 t1 w0 w1 warm=$((n / 10 < 500 ? n / 10 : 500))
    local pid=${PROXY_PID:-$SIDECAR_PID}
    w0=$(date +%s%N)
    t0=$(cpu_ticks "$pid")
    "${PIN_LOAD[@]}" "$PDLOAD" --url "$url" --body-file "$WORK/$body.json" -n "$n" -c "$c" \
        --warmup "$warm" --max-secs "$MAX_SECS" --label "$scenario/$side" "$@" >"$WORK/run.json"
    t1=$(cpu_ticks "$pid")
    w1=$(date +%s%N)
    python3 - "$WORK/run.json" "$scenario" "$side" "$((t1 - t0))" "$(getconf CLK_TCK)" "$warm" \
        "$(((w1 - w0) / 1000))" >>"$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
# The proxy's CPU time over the whole pdload run (warm-up included), and that run's wall time.
r.update(scenario=sys.argv[2], side=sys.argv[3],
         sidecar_cpu_s=int(sys.argv[4]) / int(sys.argv[5]), warmup=int(sys.argv[6]),
         wall_s=int(sys.argv[7]) / 1e6)
print(json.dumps(r))
PY
    python3 - "$WORK/run.json" >&2 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bad = r["errors"] + r["non2xx"] + r["bad_stream"]
print(f"  {r['label']:<22} ok={r['ok']:<6} failed={bad:<3} {r['rps']:>9.0f}/s  "
      f"p50={r['lat_p50_ms']} ms  p99={r['lat_p99_ms']} ms  ttfb50={r['ttfb_p50_ms']} ms")
PY
}

want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

DIRECT=http://127.0.0.1:$DEC_PORT/v1/completions
THROUGH=http://127.0.0.1:$SIDECAR_PORT/v1/completions
PD_HEADER=(-H "x-prefiller-host-port: 127.0.0.1:$PRE_PORT")

echo "scenarios (each run bounded by its count and MAX_SECS=$MAX_SECS; $REPEAT runs each):" >&2
for _ in $(seq "$REPEAT"); do
    # P/D: direct is one call to the decoder; through the sidecar, a prefill and a decode.
    for c in 1 16 64; do
        want "pd_c$c" || continue
        n=$([ "$c" = 1 ] && echo 3000 || echo 40000)
        load "pd_c$c" direct "$DIRECT" small "$n" "$c"
        load "pd_c$c" sidecar "$THROUGH" small "$n" "$c" "${PD_HEADER[@]}"
        # nginx: one hop (it cannot run P/D), the floor a proxy's per-request cost is held to.
        [ -z "$NGINX_PID" ] || PROXY_PID=$NGINX_PID load "pd_c$c" nginx "$NGINX_URL" small "$n" "$c"
    done
    if want pd_c1_busy; then
        load pd_c1_busy direct "$DIRECT" small 3000 1
        SIDECAR_PID=$BUSY_PID load pd_c1_busy sidecar "http://127.0.0.1:$BUSY_PORT/v1/completions" \
            small 3000 1 "${PD_HEADER[@]}"
    fi
    if want pass_c16; then
        load pass_c16 direct "$DIRECT" small 40000 16
        load pass_c16 sidecar "$THROUGH" small 40000 16
        [ -z "$NGINX_PID" ] || PROXY_PID=$NGINX_PID load pass_c16 nginx "$NGINX_URL" small 40000 16
    fi
    if want stream_c16; then
        load stream_c16 direct "$DIRECT" stream 20000 16 --stream
        load stream_c16 sidecar "$THROUGH" stream 20000 16 --stream "${PD_HEADER[@]}"
    fi
    if want big400k_c4; then
        load big400k_c4 direct "$DIRECT" big 2000 4
        load big400k_c4 sidecar "$THROUGH" big 2000 4 "${PD_HEADER[@]}"
        [ -z "$NGINX_PID" ] || PROXY_PID=$NGINX_PID load big400k_c4 nginx "$NGINX_URL" big 2000 4
    fi
    # Paced streams: what a proxy spends per relayed event when events come one at a time.
    if want paced_c$PACED_STREAMS; then
        n=$((PACED_STREAMS * 2))
        load "paced_c$PACED_STREAMS" direct "$DIRECT" paced "$n" "$PACED_STREAMS" --stream
        load "paced_c$PACED_STREAMS" sidecar "$THROUGH" paced "$n" "$PACED_STREAMS" --stream "${PD_HEADER[@]}"
        [ -z "$NGINX_PID" ] || PROXY_PID=$NGINX_PID load "paced_c$PACED_STREAMS" nginx "$NGINX_URL" paced "$n" \
            "$PACED_STREAMS" --stream
    fi
done

# big20m_c2: 20 MiB bodies through P/D, two at a time, on a fresh sidecar whose peak RSS
# (VmHWM) is compared with its RSS before: the growth per request in flight, against the body.
if want big20m_c2; then
    for _ in $(seq "$REPEAT"); do
        load big20m_c2 direct "$DIRECT" big20m 60 2
        start_bench_sidecar sidecar-big "$DEC_PORT"
        rss0=$(rss_kib "$SC_PID")
        SIDECAR_PID=$SC_PID load big20m_c2 sidecar "http://127.0.0.1:$SC_PORT/v1/completions" big20m 60 2 \
            "${PD_HEADER[@]}"
        hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$SC_PID/status")
        printf '{"scenario":"big20m_c2","side":"peak","rss0_kib":%s,"hwm_kib":%s,"body_kib":%s,"in_flight":2}\n' \
            "$rss0" "$hwm" "$(($(stat -c %s "$WORK/big20m.json") / 1024))" >>"$RESULTS"
        kill "$SC_PID" 2>/dev/null || true
        if [ -n "$NGINX_PID" ]; then PROXY_PID=$NGINX_PID load big20m_c2 nginx "$NGINX_URL" big20m 60 2; fi
    done
fi

# The streams the slow decoder has been asked for so far.
slow_streams() {
    curl -fsS --max-time 1 "http://127.0.0.1:$SLOW_PORT/stats" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["stream"])'
}

# hold_streams SIDE PID PORT [pdload args...]: warms the proxy at PORT (process PID) with a few
# complete requests so the baseline includes its steady state, opens IDLE_STREAMS streams to
# the slow decoder through it at once, and records its VmRSS before and with them open.
hold_streams() {
    local side=$1 pid=$2 port=$3 rss0 rss1 stream0 opened=0 holder
    shift 3
    "${PIN_LOAD[@]}" "$PDLOAD" --url "http://127.0.0.1:$port/v1/completions" \
        --body-file "$WORK/small.json" -n 200 -c 4 --max-secs "$MAX_SECS" "$@" >/dev/null
    sleep 0.5
    rss0=$(rss_kib "$pid")
    stream0=$(slow_streams)
    "${PIN_LOAD[@]}" "$PDLOAD" --url "http://127.0.0.1:$port/v1/completions" \
        --body-file "$WORK/idle.json" -n "$IDLE_STREAMS" -c "$IDLE_STREAMS" --stream \
        --max-secs "$MAX_SECS" "$@" >/dev/null 2>&1 &
    holder=$!
    PIDS+=("$holder")
    for _ in $(seq $((MAX_SECS * 20))); do
        opened=$(($(slow_streams) - stream0))
        [ "$opened" -ge "$IDLE_STREAMS" ] && break
        sleep 0.05
    done
    # Let the last streams' first tokens through and transient buffers go, then take the
    # median of three samples.
    sleep 1
    rss1=$(for _ in 1 2 3; do rss_kib "$pid"; sleep 0.5; done | sort -n | sed -n 2p)
    kill "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    echo "  idle_streams ($side): $opened open, VmRSS ${rss0} KiB -> ${rss1} KiB" >&2
    printf '{"scenario":"idle_streams","side":"%s","open":%s,"rss0_kib":%s,"rss1_kib":%s}\n' \
        "$side" "$opened" "$rss0" "$rss1" >>"$RESULTS"
}

# Memory: a fresh sidecar in front of a decoder that sends one token, then waits 20 s for the
# next; IDLE_STREAMS streams are opened at once and the sidecar's VmRSS compared before/after.
if want idle_streams; then
    start_fake slow --listen "127.0.0.1:$SLOW_PORT" --token-delay-ms 20000
    wait_http "http://127.0.0.1:$SLOW_PORT/health" "fakevllm (slow decoder)"
    start_bench_sidecar sidecar-mem "$SLOW_PORT"
    hold_streams sidecar "$SC_PID" "$SC_PORT" "${PD_HEADER[@]}"
    kill "$SC_PID" 2>/dev/null || true
    if [ -n "$NGINX_BIN" ]; then
        # The same for a fresh nginx worker (one hop: client and decoder connections).
        start_nginx nginx-mem "$SLOW_PORT"
        hold_streams nginx "$NG_PID" "$NG_PORT"
    fi
fi

# instructions: the sidecar's user-space instructions per request, counted by callgrind (a
# count, not a time: the same figure whatever else the machine does). One sidecar under
# valgrind; each route is warmed, the counters zeroed, INSTR_REQUESTS requests sent at c=16,
# and the counters dumped.
INSTR_REQUESTS=${INSTR_REQUESTS:-2000}
if want instructions && [ -n "$VALGRIND" ] && command -v "$VALGRIND" >/dev/null &&
    command -v callgrind_control >/dev/null; then
    pinned=("${PIN_SIDECAR[@]}")
    PIN_SIDECAR+=("$VALGRIND" --tool=callgrind -q "--callgrind-out-file=$WORK/callgrind.%p")
    start_bench_sidecar sidecar-cg "$DEC_PORT"
    PIN_SIDECAR=("${pinned[@]}")
    part=0
    for route in pd pass; do
        hdr=(); [ "$route" = pass ] || hdr=("${PD_HEADER[@]}")
        "${PIN_LOAD[@]}" "$PDLOAD" --url "http://127.0.0.1:$SC_PORT/v1/completions" \
            --body-file "$WORK/small.json" -n 300 -c 16 --max-secs 60 --label warm "${hdr[@]}" >/dev/null
        callgrind_control -z "$SC_PID" >/dev/null
        "${PIN_LOAD[@]}" "$PDLOAD" --url "http://127.0.0.1:$SC_PORT/v1/completions" \
            --body-file "$WORK/small.json" -n "$INSTR_REQUESTS" -c 16 --max-secs 120 \
            --label "instructions/$route" "${hdr[@]}" >"$WORK/run.json"
        callgrind_control -d "$SC_PID" >/dev/null
        part=$((part + 1))
        for _ in $(seq 100); do [ -s "$WORK/callgrind.$SC_PID.$part" ] && break; sleep 0.05; done
        total=$(awk '/^summary:/ {print $2}' "$WORK/callgrind.$SC_PID.$part")
        ok=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ok"])' "$WORK/run.json")
        echo "  instructions/$route: ${total:-?} in $ok requests" >&2
        printf '{"scenario":"instructions","side":"%s","instructions":%s,"requests":%s}\n' \
            "$route" "${total:-0}" "$ok" >>"$RESULTS"
    done
    kill "$SC_PID" 2>/dev/null || true
fi

# --- report ----------------------------------------------------------------------------------
mkdir -p "$(dirname "$BENCH_OUT")"
PACED_STREAMS=$PACED_STREAMS python3 "$REPO/scripts/bench_table.py" "$RESULTS" "$SIDECAR_ARGS" "$MAX_SECS" | tee "$BENCH_OUT"
echo "written to $BENCH_OUT" >&2
