#!/usr/bin/env bash
# `make demo`: a prefill and a decode vLLM simulator on loopback, the sidecar in front of the
# decoder with -connector=nixlv2, the README's curl request, and a trace of what happened.
# Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./bin}
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
init_scratch
start_sim PREFILL prefill --ttft-ms 40
start_sim DECODE decode --itl-ms 15
start_sidecar -vllm-port="$DECODE" -connector=nixlv2

echo "prefill sim :$PREFILL   decode sim :$DECODE   sidecar :$SIDECAR (-connector=nixlv2)"
echo
echo "\$ curl -s localhost:$SIDECAR/v1/completions -H 'content-type: application/json' \\"
echo "    -H 'x-prefiller-host-port: localhost:$PREFILL' \\"
echo "    -d '{\"model\":\"sim-model\",\"prompt\":\"San Francisco is a\",\"max_tokens\":8}'"
curl -sS --max-time 10 "localhost:$SIDECAR/v1/completions" -H 'content-type: application/json' \
    -H "x-prefiller-host-port: localhost:$PREFILL" \
    -d '{"model":"sim-model","prompt":"San Francisco is a","max_tokens":8}' >"$WORK/reply.json"

python3 - "$WORK/reply.json" "$PREFILL" "$DECODE" <<'PY'
import json, sys, urllib.request
reply = json.load(open(sys.argv[1]))
print(json.dumps(reply, indent=2))
get = lambda port, path: json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5))
p_req = get(sys.argv[2], "/sim/requests")
d_req = get(sys.argv[3], "/sim/requests")
p_req = p_req if isinstance(p_req, list) else p_req["requests"]
d_req = d_req if isinstance(d_req, list) else d_req["requests"]
p_body, d_body = json.loads(p_req[-1]["body"]), json.loads(d_req[-1]["body"])
rid = lambda r: (r["headers"].get("x-request-id") or ["?"])[0]
print("\ntrace")
print(f"  1. prefill leg -> :{sys.argv[2]}  x-request-id={rid(p_req[-1])}")
print(f"     max_tokens={p_body.get('max_tokens')} stream={json.dumps(p_body.get('stream'))} kv_transfer_params={json.dumps(p_body.get('kv_transfer_params'))}")
print(f"  2. prefiller returned kv_transfer_params:")
print(f"     {json.dumps(d_body.get('kv_transfer_params'))}")
print(f"  3. decode leg  -> :{sys.argv[3]}  x-request-id={rid(d_req[-1])}  max_tokens={d_body.get('max_tokens')}")
state = get(sys.argv[2], "/sim/wait?until=idle_and_no_leases&timeout_ms=2000")
c = state["counters"]
print(f"  4. prefiller KV leases: created={c['leases_created']} pulled by the decoder={c['leases_pulled']} still held={state['kv']['leases_held']}")
ok = c["leases_pulled"] == 1 and d_body.get("kv_transfer_params", {}).get("do_remote_prefill") is True
print("\nP/D happened: the decoder pulled the prefiller's KV blocks." if ok else "\nP/D did NOT happen")
sys.exit(0 if ok else 1)
PY
