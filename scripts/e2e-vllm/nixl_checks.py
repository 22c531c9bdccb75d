#!/usr/bin/env python3
"""`make e2e-vllm`, NIXL pairs: the sidecar's nixlv2 flow in front of a real vLLM prefiller and
decoder with NixlConnector (--mode pull, the decoder READs the blocks) or NixlPushConnector
(--mode push, the prefiller WRITEs them into blocks the decoder registered), CPU KV buffer.

    nixl_checks.py --mode pull|push --sidecar BIN --prefill PORT --decode PORT --logs DIR

run.sh starts both vLLM servers on 127.0.0.1 and calls this; this script starts and stops the
sidecar processes itself and talks to everything over loopback (common.py). Stdlib only.

The proof of a hand-off is the decoder's
vllm:prompt_tokens_by_source_total{source="external_kv_transfer"} rising by exactly the prompt's
token count, with vllm:nixl_xfer_time_seconds_count +1 on the side that moved the blocks (the
decoder when it pulls, the prefiller when it pushes) as a second signal, and greedy output
equal to the same request sent plainly to the decoder. The first check fails on a vLLM other
than common.EXPECTED_VLLM.

It prints one line per check and ends with "N passed, N failed, N skipped"; the exit status is
1 if any check failed. Observations that are not pass/fail (the legacy `nixl` connector's
expected degradation, what happens to the prefiller's blocks when the decoder is down) are
INFO lines with what was measured.
"""
import argparse
import http.client
import json
import os
import re
import statistics
import sys
import time

from common import (EXPECTED_VLLM, EXTERNAL, EXTERNAL_LABELS, GEN_TOKENS, KV_USAGE, MIN_PROMPT_TOKENS, MODEL, RUNNING, SUCCESS,
                    TIMEOUT, WAITING, CheckFailed, CheckSkipped, Log, Sidecar, Stream, chat_body, check,
                    completion_body, free_port, metric, need, pd_at_once, pd_headers, post_json, report, request,
                    summary,
                    text_of, wait_for)
from common import c_vllm_version

# Counts completed NIXL KV transfers on the side that moved the blocks (one per P/D request).
XFER = "vllm:nixl_xfer_time_seconds_count"
FAILED_XFER = "vllm:nixl_num_failed_transfers_total"
# What fresh prompts are grown with, a sentence at a time, to the length a check needs.
FILLER = " The cable cars climbed past the old brick warehouses as the bay lights came on."

# ---------------------------------------------------------------- the checks


class Ctx:
    def __init__(self, args):
        self.args = args
        self.prefill = args.prefill
        self.decode = args.decode
        self.plog = Log(os.path.join(args.logs, "prefill.log"))
        self.dlog = Log(os.path.join(args.logs, "decode.log"))
        self.n = 0
        self.figures = {}
        # Who moves the blocks: the decoder READs them (pull) or the prefiller WRITEs them (push).
        self.push = args.mode == "push"
        self.mover, self.other = (self.prefill, self.decode) if self.push else (self.decode, self.prefill)
        self.mover_name = "prefiller" if self.push else "decoder"

    def prompt(self, what):
        # A fresh prompt per request so neither server's prefix cache can serve it, and short
        # (under one 128-token CPU block) so no full block is ever cached locally.
        self.n += 1
        return f"Request {self.n} ({what}): San Francisco is a city where the fog"

    def pd_prompt(self, what, low=MIN_PROMPT_TOKENS, high=120):
        """A fresh prompt of `low`..`high` tokens (counted by the decoder's /tokenize): long enough
        to be transferred rather than recomputed, under one 128-token CPU block (no full block is
        cached locally, so the plain comparison recomputes it), and far inside the 512 context."""
        text = self.prompt(what)
        for _ in range(20):
            n = self.count_tokens(text)
            if n >= low:
                need(n <= high, f"prompt of {n} tokens, more than {high}")
                return text
            text += FILLER
        raise CheckFailed(f"no prompt of {low} tokens")

    def count_tokens(self, text, port=None):
        status, _, reply, raw = post_json(port or self.decode, "/tokenize", {"model": MODEL, "prompt": text})
        need(status == 200, f"/tokenize: {status} {raw[:200]!r}")
        return reply["count"]

    def sidecar(self, connector, vllm_port=None, extra=()):
        return Sidecar(self.args.sidecar, connector, vllm_port or self.decode, self.args.logs, extra)

    def plain(self, path, body):
        status, _, reply, raw = post_json(self.decode, path, body)
        need(status == 200, f"plain request to the decoder: {status} {raw[:300]!r}")
        return reply

    def wait_prefiller_kv_free(self, timeout):
        """Seconds until the prefiller's KV usage is 0 (None if not within timeout)."""
        t0 = time.monotonic()
        ok = wait_for(lambda: metric(self.prefill, KV_USAGE) == 0.0, timeout, 0.25)
        return time.monotonic() - t0 if ok else None



class Handoff:
    """The hand-off counters before a request; check() after it: exactly `n` hand-offs, i.e. the
    decoder's `vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}` rose (by the
    prompts' token count when known) and `vllm:nixl_xfer_time_seconds_count` rose by exactly `n`
    on the side that moves the blocks (ctx.mover) and by 0 on the other."""

    def __init__(self, ctx, n=1):
        self.ctx, self.n = ctx, n
        self.ext0 = metric(ctx.decode, EXTERNAL, **EXTERNAL_LABELS)
        self.xfer0 = metric(ctx.mover, XFER)
        self.other0 = metric(ctx.other, XFER)

    def deltas(self):
        """(external KV tokens on the decoder, transfers counted by the mover)"""
        return (metric(self.ctx.decode, EXTERNAL, **EXTERNAL_LABELS) - self.ext0,
                metric(self.ctx.mover, XFER) - self.xfer0)

    def arrived(self):
        """Whether the counters show external KV and all `n` transfers (one scrape of each side)."""
        ext, xfer = self.deltas()
        return ext > 0 and xfer >= self.n

    def check(self, label, prompt_tokens=None):
        # vLLM updates its Prometheus counters a moment after the reply: poll, then settle.
        wait_for(self.arrived, 10)
        time.sleep(0.3)
        ext, xfer = self.deltas()
        other = metric(self.ctx.other, XFER) - self.other0
        side = self.ctx.mover_name
        need(ext > 0, f"{label}: decoder's {EXTERNAL}{{source=\"external_kv_transfer\"}} did not rise: no hand-off")
        need(xfer == self.n, f"{label}: the {side}'s {XFER} +{xfer:.0f}, expected exactly {self.n}")
        need(other == 0, f"{label}: the other side's {XFER} +{other:.0f}: the {side} should have moved the blocks")
        if prompt_tokens is not None:
            need(ext == prompt_tokens, f"{label}: {ext:.0f} external KV tokens for {prompt_tokens} prompt tokens")
        return f"decoder external_kv_transfer +{ext:.0f}, {side}'s {XFER} +{xfer:.0f}"


def pd_matches_plain(ctx, sc, path, body, label, text=None, prompt_tokens=None):
    """One P/D request through the sidecar: 200, same greedy text as the same request sent plainly
    to the decoder, exactly one hand-off (Handoff). `text` reads the output of a reply,
    `prompt_tokens` the prompt's token count (both default to the OpenAI shapes)."""
    text = text or text_of
    prompt_tokens = prompt_tokens or (lambda r: (r.get("usage") or {}).get("prompt_tokens"))
    handoff = Handoff(ctx)
    pre0 = metric(ctx.prefill, SUCCESS)
    status, hdrs, reply, raw = post_json(sc.port, path, body, pd_headers(ctx.prefill))
    if status != 200:
        # Not the sidecar's fault if the decoder itself does not serve the route (not registered,
        # disabled, or no chat template for the tiny model): then SKIP with vLLM's own words.
        p_status, _, _, p_raw = post_json(ctx.decode, path, body)
        if p_status in (403, 404, 405, 501) or (p_status == 400 and b"template" in p_raw):
            raise CheckSkipped(f"vLLM {EXPECTED_VLLM} does not serve {path} here: plain request to the decoder "
                               f"answered {p_status} {p_raw[:300]!r}")
    need(status == 200, f"{label}: sidecar answered {status}: {raw[:400]!r}")
    need("x-request-id" in hdrs, f"{label}: no x-request-id on the reply")
    n = prompt_tokens(reply)
    need(n is None or n >= MIN_PROMPT_TOKENS, f"{label}: {n}-token prompt, under {MIN_PROMPT_TOKENS}")
    proof = handoff.check(label, n)
    need(metric(ctx.prefill, SUCCESS) - pre0 >= 1, f"{label}: the prefiller served no request")
    plain = ctx.plain(path, body)
    need(text(reply) == text(plain), f"{label}: P/D text {text(reply)!r} != plain {text(plain)!r}")
    return reply, proof



def c_pd_completion(ctx, sc):
    reply, proof = pd_matches_plain(ctx, sc, "/v1/completions", completion_body(ctx.pd_prompt("completion")), "completion")
    return (f"{reply['usage']['prompt_tokens']}-token prompt, {reply['usage']['completion_tokens']} tokens "
            f"{text_of(reply)!r} = plain; {proof}")


def c_pd_chat(ctx, sc):
    reply, proof = pd_matches_plain(ctx, sc, "/v1/chat/completions", chat_body(ctx.pd_prompt("chat")), "chat")
    return f"{reply['usage']['prompt_tokens']}-token prompt, {reply['usage']['completion_tokens']} tokens = plain; {proof}"


def responses_text(reply):
    return "".join(c.get("text", "") for item in reply.get("output", []) if item.get("type") == "message"
                   for c in item.get("content", []) if c.get("type") == "output_text")


def c_pd_responses(ctx, sc):
    body = {"model": MODEL, "input": ctx.pd_prompt("responses"), "max_output_tokens": 16, "temperature": 0}
    reply, proof = pd_matches_plain(ctx, sc, "/v1/responses", body, "responses", responses_text,
                                    lambda r: (r.get("usage") or {}).get("input_tokens"))
    return (f"{reply['usage']['input_tokens']}-token input, {reply['usage']['output_tokens']} tokens "
            f"{responses_text(reply)!r} = plain; {proof}")


def messages_text(reply):
    return "".join(c.get("text", "") for c in reply.get("content", []) if c.get("type") == "text")


def c_pd_messages(ctx, sc):
    body = {"model": MODEL, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": ctx.pd_prompt("messages")}]}
    reply, proof = pd_matches_plain(ctx, sc, "/v1/messages", body, "messages", messages_text,
                                    lambda r: (r.get("usage") or {}).get("input_tokens"))
    return (f"{reply['usage']['input_tokens']}-token input, {reply['usage']['output_tokens']} tokens "
            f"{messages_text(reply)!r} = plain; {proof}")


def generate_ids(reply):
    return reply["choices"][0]["token_ids"]


def c_pd_generate(ctx, sc):
    """vLLM's token-in/token-out API (served with --enable-scale-out): token ids in, the limits
    in sampling_params, kv_transfer_params top-level; the reply's output is token ids."""
    status, _, tok, raw = post_json(ctx.decode, "/tokenize", {"model": MODEL, "prompt": ctx.pd_prompt("generate")})
    need(status == 200, f"/tokenize: {status} {raw[:200]!r}")
    body = {"model": MODEL, "token_ids": tok["tokens"],
            "sampling_params": {"max_tokens": 16, "temperature": 0, "ignore_eos": True}}
    reply, proof = pd_matches_plain(ctx, sc, "/inference/v1/generate", body, "generate", generate_ids,
                                    lambda r: tok["count"])
    return f"{tok['count']} token ids in, {len(generate_ids(reply))} ids out = plain; {proof}"


def c_pd_stream(ctx, sc):
    body = completion_body(ctx.pd_prompt("stream"), 24, stream=True, stream_options={"include_usage": True})
    handoff = Handoff(ctx)
    s = Stream(sc.port, "/v1/completions", body, pd_headers(ctx.prefill))
    try:
        need(s.status == 200, f"sidecar answered {s.status}")
        need(s.headers.get("content-type", "").startswith("text/event-stream"), f"content-type {s.headers.get('content-type')}")
        pieces, usage, done, events = [], None, False, 0
        for data in s.events():
            if data == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            events += 1
            if ev.get("choices"):
                pieces.append(ev["choices"][0].get("text", ""))
            if ev.get("usage"):
                usage = ev["usage"]
    finally:
        s.close()
    need(done, "no [DONE] event")
    # vLLM may put several tokens in one event when its output queue backs up (a loaded machine).
    need(len(pieces) >= 2, f"{len(pieces)} content event(s): not streamed")
    need(usage and usage.get("completion_tokens") == 24, f"no final usage chunk (stream_options lost?): {usage}")
    plain = text_of(ctx.plain("/v1/completions", completion_body(body["prompt"], 24)))
    need("".join(pieces) == plain, f"streamed {''.join(pieces)!r} != plain {plain!r}")
    proof = handoff.check("stream", usage.get("prompt_tokens"))
    return f"{len(pieces)} content events + usage chunk + [DONE] for 24 tokens, text = plain; {proof}"


def c_client_leaves_mid_stream(ctx, sc):
    """vLLM 0.32 does not count aborts in request_success_total{finished_reason="abort"} (it
    stays 0), so the proof is its request log (--enable-log-requests): "Request <id> aborted."
    for the id the sidecar sent (x-request-id), and the decoder stopping well short of
    max_tokens with nothing left running."""
    max_tokens = 400
    body = completion_body(ctx.prompt("leave"), max_tokens, stream=True)
    rid = f"e2e-leave-{int(time.time() * 1000)}"
    gen0 = metric(ctx.decode, GEN_TOKENS)
    abort_metric0 = metric(ctx.decode, SUCCESS, finished_reason="abort")
    ctx.dlog.mark()
    s = Stream(sc.port, "/v1/completions", body, dict(pd_headers(ctx.prefill), **{"x-request-id": rid}))
    got = 0
    try:
        need(s.status == 200, f"sidecar answered {s.status}")
        for _ in s.events():
            got += 1
            if got == 3:
                break
    finally:
        s.close()
    left_at = time.monotonic()
    need(got == 3, f"stream ended after {got} events")
    pattern = re.compile(r"Request cmpl-" + re.escape(rid) + r"\S* aborted")
    line = wait_for(lambda: next((l.strip() for l in ctx.dlog.since().splitlines() if pattern.search(l)), None), 15)
    abort_s = time.monotonic() - left_at
    idle = wait_for(lambda: metric(ctx.decode, RUNNING) + metric(ctx.decode, WAITING) == 0, 15)
    generated = metric(ctx.decode, GEN_TOKENS) - gen0
    need(line, f"no 'Request cmpl-{rid}-... aborted.' in the decoder log within 15 s")
    need(idle, "decoder still has a running/waiting request")
    need(generated < max_tokens, f"decoder generated {generated:.0f} tokens: the request ran to max_tokens")
    abort_metric = metric(ctx.decode, SUCCESS, finished_reason="abort") - abort_metric0
    return (f"decoder log {line[line.index('Request'):]!r} {abort_s:.2f} s after the client left; "
            f"{GEN_TOKENS} +{generated:.0f} of max_tokens {max_tokens}; {RUNNING}+{WAITING} = 0; "
            f'({SUCCESS}{{finished_reason="abort"}} +{abort_metric:.0f}: 0.32 does not count aborts there)')


def c_client_leaves_during_prefill(ctx, sc, want_tokens=1900):
    """A client that leaves while the prefiller is still computing a long prompt: the sidecar
    drops the prefill leg, vLLM aborts it (request log "Request <id> aborted.", nothing left in
    vllm:num_requests_running), it never finishes, no KV stays held (vllm:kv_cache_usage_perc
    back to 0) and the decoder never hears of it. run.sh gives the prefiller
    --max-num-batched-tokens 256, so a ~1900-token prompt is prefilled in 8 steps (0.3-2.5 s
    here): the abort lands between two of them. Run with -prefill-abandon-grace=0, so the
    sidecar closes the leg as soon as the client leaves."""
    text = ctx.prompt("leave during prefill")
    base = ctx.count_tokens(text, ctx.prefill)
    per = (ctx.count_tokens(text + FILLER * 10, ctx.prefill) - base) / 10
    text += FILLER * int((want_tokens - base) / per)
    n = ctx.count_tokens(text, ctx.prefill)
    need(want_tokens * 0.9 <= n <= 2000, f"a {n}-token prompt, wanted about {want_tokens} (the context is 2048)")
    rid = f"e2e-leave-prefill-{int(time.time() * 1000)}"
    need(ctx.wait_prefiller_kv_free(30) is not None, "prefiller KV not idle before the check")
    done0 = metric(ctx.prefill, SUCCESS)
    ctx.plog.mark()
    ctx.dlog.mark()
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps(completion_body(text, 16)).encode(),
                 headers=dict(pd_headers(ctx.prefill), **{"x-request-id": rid, "content-type": "application/json"}))
    t0 = time.monotonic()
    running = wait_for(lambda: metric(ctx.prefill, RUNNING) >= 1, 30, 0.02)
    started_s = time.monotonic() - t0
    held = metric(ctx.prefill, KV_USAGE)
    conn.sock.close()  # the client leaves; its request is still being prefilled
    conn.close()
    left_at = time.monotonic()
    need(running, "the prefill never started running on the prefiller")
    pattern = re.compile(r"Request cmpl-" + re.escape(rid) + r"\S* aborted")
    line = wait_for(lambda: next((l.strip() for l in ctx.plog.since().splitlines() if pattern.search(l)), None), 20)
    abort_s = time.monotonic() - left_at
    idle = wait_for(lambda: metric(ctx.prefill, RUNNING) + metric(ctx.prefill, WAITING) == 0, 20)
    freed_s = ctx.wait_prefiller_kv_free(20)
    finished = metric(ctx.prefill, SUCCESS) - done0
    need(line, f"no 'Request cmpl-{rid}-... aborted.' in the prefiller log within 20 s")
    need(idle, "the prefiller still has the request running or waiting")
    need(finished == 0, f"the prefiller finished {finished:.0f} request(s): the prefill ran to the end")
    need(freed_s is not None, "the prefiller's KV usage did not return to 0 within 20 s: blocks held")
    need(rid not in ctx.dlog.since(), "the decoder got a request the client had left")
    ctx.figures["leave_during_prefill"] = {"prompt_tokens": n, "abort_s": abort_s, "kv_freed_s": freed_s}
    return (f"{n}-token prompt, client left {started_s:.2f} s after sending, with the prefill running "
            f"(prefiller KV usage {held:.3f}); prefiller log {line[line.index('Request'):]!r} {abort_s:.2f} s later, "
            f"{RUNNING} 0, never finished, {KV_USAGE} 0 after {abort_s + freed_s:.2f} s; the decoder saw nothing")


def c_pd_multi_block(ctx, sc):
    """A prompt over two full 128-token blocks: every block is handed over (needs the decoder's
    prefix cache off, as the push pair runs, so that the plain reference recomputes)."""
    text = ctx.prompt("three blocks")
    while ctx.count_tokens(text) < 290:
        text += FILLER
    reply, proof = pd_matches_plain(ctx, sc, "/v1/completions", completion_body(text), "three blocks")
    return f"{reply['usage']['prompt_tokens']}-token prompt (3 blocks) = plain; {proof}"


def c_pd_concurrent(ctx, sc, n=8):
    """n P/D requests at once: n hand-offs, every prompt token external, each text = plain."""
    prompts = [ctx.pd_prompt(f"concurrent {i}") for i in range(n)]
    tokens = sum(ctx.count_tokens(p) for p in prompts)
    handoff = Handoff(ctx, n)
    texts, wall = pd_at_once(sc.port, ctx.prefill, "/v1/completions", [completion_body(p) for p in prompts])
    proof = handoff.check(f"{n} at once", tokens)
    bad = [i for i, (p, t) in enumerate(zip(prompts, texts)) if t != text_of(ctx.plain("/v1/completions", completion_body(p)))]
    need(not bad, f"P/D text != plain for request(s) {bad} of {n}")
    return f"{n} at once ({tokens} prompt tokens) in {wall:.2f} s, every text = plain; {proof}"


def c_passthrough(ctx, sc):
    handoff = Handoff(ctx)
    body = completion_body(ctx.pd_prompt("pass-through"))
    status, _, reply, raw = post_json(sc.port, "/v1/completions", body)
    need(status == 200, f"{status} {raw[:200]!r}")
    need(text_of(reply) == text_of(ctx.plain("/v1/completions", body)), "text differs from plain")
    status, _, raw = request(sc.port, "GET", "/v1/models")
    need(status == 200 and json.loads(raw)["data"][0]["id"] == MODEL, f"/v1/models: {status} {raw[:200]!r}")
    time.sleep(0.5)
    need(handoff.deltas() == (0, 0), f"a request without the prefiller header caused a hand-off: "
                                     f"external_kv_transfer, {XFER} +{handoff.deltas()}")
    return "no prefiller header: served by the decoder alone, no KV transfer; GET /v1/models relayed"


def c_latency(ctx, sc, reps=7):
    """Wall time of a 16-token greedy completion (fresh prompt each time): plain to the decoder,
    through the sidecar without P/D, and P/D through the sidecar. Interleaved in a rotating
    order after one warm-up round, each kind on its own keep-alive connection (as the sidecar's
    pool talks to vLLM), so that only the P/D work differs. Min and median: on a shared 2-core
    machine the median moves with the load, the min much less."""
    kinds = {"plain": (ctx.decode, {}), "pass_through": (sc.port, {}), "pd": (sc.port, pd_headers(ctx.prefill))}
    conns = {k: http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT) for k, (port, _) in kinds.items()}
    samples = {k: [] for k in kinds}

    def once(k):
        body = json.dumps(completion_body(ctx.prompt("latency"), 16)).encode()
        headers = dict(kinds[k][1], **{"content-type": "application/json"})
        for attempt in (1, 2):
            t0 = time.perf_counter()
            try:
                conns[k].request("POST", "/v1/completions", body=body, headers=headers)
                resp = conns[k].getresponse()
                raw = resp.read()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # The server closed the idle keep-alive connection (vLLM: after 5 s): reconnect.
                conns[k].close()
                if attempt == 2:
                    raise
        need(resp.status == 200, f"{k}: {resp.status} {raw[:200]!r}")
        return (time.perf_counter() - t0) * 1e3

    try:
        names = list(kinds)
        for rep in range(reps + 1):
            # Rotate the order each round so no kind always follows the same one.
            for k in names[rep % 3:] + names[:rep % 3]:
                ms = once(k)
                if rep:
                    samples[k].append(ms)
    finally:
        for c in conns.values():
            c.close()
    fig = {k: {"min": min(v), "median": statistics.median(v)} for k, v in samples.items()}
    ctx.figures["latency_ms"] = fig
    show = lambda k: f"{fig[k]['min']:.0f}/{fig[k]['median']:.0f} ms"
    return (f"{reps} rounds, 16 tokens, keep-alive, min/median: plain to decoder {show('plain')}, through sidecar "
            f"without P/D {show('pass_through')}, P/D via sidecar {show('pd')}")


def long_chat(ctx, what, budget=440):
    """A multi-turn chat of at most `budget` tokens (the servers' context is 512), as long as
    fits: templating and tokenizing it is the work tokenize-once saves the decoder. Fresh per
    call (no cache hits)."""
    for turns in range(12, 0, -1):
        body = chat_turns(ctx.prompt(what), turns)
        status, _, counted, _ = post_json(ctx.decode, "/tokenize", {"model": MODEL, "messages": body["messages"]})
        if status == 200 and counted["count"] <= budget:
            return body
    raise CheckFailed("no chat fits the context")


def chat_turns(n, turns):
    filler = ("The harbour fog rolled over the hills while the cable cars climbed past the old "
              "brick warehouses and the bay lights came on one by one. ")
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"{n} turn {i}: {filler}"})
        messages.append({"role": "assistant", "content": f"Noted {i}. {filler[:60]}"})
    messages.append({"role": "user", "content": f"{n}: and then?"})
    return {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def first_token_ms(port, body, headers):
    """Time to the first content event of a streamed chat, in ms."""
    t0 = time.perf_counter()
    s = Stream(port, "/v1/chat/completions", dict(body, stream=True), headers)
    try:
        need(s.status == 200, f"stream: {s.status}")
        for data in s.events():
            if data == "[DONE]":
                break
            delta = json.loads(data)["choices"][0].get("delta", {})
            if delta.get("content"):
                return (time.perf_counter() - t0) * 1e3
        raise CheckFailed("no content event")
    finally:
        s.close()


def c_tokenize_once(ctx, once, plain_sc, rounds=9):
    """-tokenize-once on a long chat: the prefill leg asks for the prompt's token ids and the
    decode leg's kv_transfer_params start with them (both sidecars run with -v=5, which traces
    the legs' bodies), they are the ids the decoder renders itself (/tokenize), the decoder uses
    such ids in place of the messages, the output equals plain decoding and P/D without it, the
    client sees no token ids, and time to first token with and without. (vLLM logs an ignored
    key only at DEBUG, so the servers' INFO logs cannot show it.)"""
    body = long_chat(ctx, "tokenize-once")
    status, _, rendered, raw = post_json(ctx.decode, "/tokenize", {"model": MODEL, "messages": body["messages"]})
    need(status == 200, f"/tokenize: {status} {raw[:200]!r}")
    once.log.mark()
    reply, _ = pd_matches_plain(ctx, once, "/v1/chat/completions", body, "tokenize-once")
    need(reply.get("prompt_token_ids") is None, f"the client got prompt_token_ids: {str(reply)[:200]}")
    legs = once.log.since().splitlines()
    prefill_leg = next((l for l in legs if "prefill request" in l and "body=" in l), None)
    need(prefill_leg, f"no 'prefill request' trace in {once.log_path}")
    need('"return_token_ids":true' in prefill_leg, f"the prefill leg has no return_token_ids: {prefill_leg[-300:]!r}")
    decode_leg = next((l for l in legs if "decode request" in l and "body=" in l), None)
    need(decode_leg, f"no 'decode request' trace in {once.log_path}")
    m = re.search(r'"kv_transfer_params":\{"prompt_token_ids":\[([0-9, ]*)\]', decode_leg)
    need(m, f"the decode leg's kv_transfer_params do not start with prompt_token_ids: {decode_leg[-300:]!r}")
    sent = [int(x) for x in m.group(1).split(",") if x.strip()]
    need(sent == rendered["tokens"], f"the decode leg's {len(sent)} ids != the decoder's own rendering "
                                     f"({rendered['count']} tokens)")
    status, _, without, raw = post_json(plain_sc.port, "/v1/chat/completions", body, pd_headers(ctx.prefill))
    need(status == 200 and text_of(without) == text_of(reply), f"without tokenize-once: {status} {raw[:200]!r}")
    # The decoder serves the ids, not the messages: another chat's ids under this chat's
    # messages give the other chat's plain output.
    other = long_chat(ctx, "other ids")
    status, _, other_ids, raw = post_json(ctx.decode, "/tokenize", {"model": MODEL, "messages": other["messages"]})
    need(status == 200, f"/tokenize: {status} {raw[:200]!r}")
    swapped = ctx.plain("/v1/chat/completions", dict(body, kv_transfer_params={"prompt_token_ids": other_ids["tokens"]}))
    need(swapped["usage"]["prompt_tokens"] == other_ids["count"]
         and text_of(swapped) == text_of(ctx.plain("/v1/chat/completions", other)),
         f"ids of another chat: {swapped['usage']['prompt_tokens']} prompt tokens (ids: {other_ids['count']}), "
         "text != that chat's plain text")
    # Malformed ids straight to the decoder are refused: vLLM reads the key (and so would have
    # refused the sidecar's if they were wrong).
    bad = dict(body, kv_transfer_params={"prompt_token_ids": [-1]})
    status, _, _, raw = post_json(ctx.decode, "/v1/chat/completions", bad)
    need(status == 400 and b"prompt_token_ids" in raw, f"malformed ids: {status} {raw[:200]!r}")
    samples = {"tokenize_once": [], "plain_pd": []}
    for r in range(rounds + 1):
        order = [("tokenize_once", once), ("plain_pd", plain_sc)]
        for name, sc in (order if r % 2 else order[::-1]):
            ms = first_token_ms(sc.port, long_chat(ctx, "ttft"), pd_headers(ctx.prefill))
            if r:
                samples[name].append(ms)
    fig = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in samples.items()}
    ctx.figures["tokenize_once_ttft_ms"] = fig
    usage = reply["usage"]["prompt_tokens"]
    show = lambda k: f"{fig[k]['min']:.1f}/{fig[k]['median']:.1f}/{fig[k]['max']:.1f} ms"
    return (f"{usage}-token chat prompt, decode leg carried its {len(sent)} ids (= decoder's /tokenize), "
            f"another chat's ids served as that chat; {rounds} rounds alternating, TTFT min/median/max: with "
            f"{show('tokenize_once')}, without {show('plain_pd')}; output equal")


def c_legacy_nixl(ctx, sc):
    """-connector=nixl sends top-level do_remote_decode, which upstream vLLM ignores."""
    sc.log.mark()
    handoff = Handoff(ctx)
    body = completion_body(ctx.pd_prompt("legacy nixl"))
    status, _, reply, raw = post_json(sc.port, "/v1/completions", body, pd_headers(ctx.prefill))
    need(status == 200, f"sidecar answered {status}: {raw[:300]!r}")
    need(text_of(reply) == text_of(ctx.plain("/v1/completions", body)), "text differs from plain")
    time.sleep(1.0)
    ext, transfers = handoff.deltas()
    freed = ctx.wait_prefiller_kv_free(5)
    warned = "prefill locally" in sc.log.since()
    return (f"200, text = plain, decoder external_kv_transfer +{ext:.0f}, {XFER} +{transfers:.0f} "
            "(the decoder recomputed the prompt), "
            f"prefiller KV {'not pinned' if freed is not None else 'STILL PINNED'}, "
            f"sidecar warned 'decoder will prefill locally': {warned}")


def c_decoder_down(ctx):
    """The decoder is down after a prefill: the sidecar answers 502 and sends nothing else (a
    decode sent to the prefiller itself fails vLLM's NIXL self-handshake, so there is nothing
    to release the blocks early); the next request gets 502 without a prefill; the prefiller's
    blocks are freed by its lease. Compared with the lease-expiry reference (a prefill that no
    decoder ever pulls)."""
    lease = ctx.args.lease
    need(ctx.wait_prefiller_kv_free(30) is not None, "prefiller KV not idle before the experiment")
    findings = []

    # Reference: a prefill that no decoder ever pulls; only the lease frees its blocks.
    ctx.plog.mark()
    body = completion_body(ctx.prompt("expiry reference"), 1, stream=False)
    body.pop("ignore_eos")
    body["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                  "remote_block_ids": None, "remote_host": None, "remote_port": None}
    status, _, reply, raw = post_json(ctx.prefill, "/v1/completions", body)
    need(status == 200 and reply.get("kv_transfer_params"), f"reference prefill: {status} {raw[:300]!r}")
    pinned = metric(ctx.prefill, KV_USAGE)
    expiry_s = ctx.wait_prefiller_kv_free(lease + 60)
    expiry_log = [l.strip() for l in ctx.plog.since().splitlines() if "xpired" in l]
    findings.append(f"expiry path: KV usage {pinned:.4f} after the prefill, back to 0 after "
                    + (f"{expiry_s:.1f} s" if expiry_s is not None else f"> {lease + 60} s (NOT freed)")
                    + (f"; log: {expiry_log[0][-110:]}" if expiry_log else ""))
    ctx.figures["expiry_s"] = expiry_s

    # The sidecar with a dead decoder port.
    dead = free_port()
    ctx.plog.mark()
    pre_ok0 = metric(ctx.prefill, SUCCESS)
    pre_abort0 = metric(ctx.prefill, SUCCESS, finished_reason="abort")
    pre_xfer0 = metric(ctx.prefill, XFER)
    pre_fail0 = metric(ctx.prefill, FAILED_XFER)
    with ctx.sidecar("nixlv2", dead) as sc:
        sc.log.mark()
        rid = f"e2e-decoder-down-{int(time.time() * 1000)}"
        body = completion_body(ctx.prompt("decoder down"), 16)
        t0 = time.monotonic()
        status, _, reply, raw = post_json(sc.port, "/v1/completions", body,
                                          dict(pd_headers(ctx.prefill), **{"x-request-id": rid}))
        need(status == 502, f"sidecar answered {status}, expected 502: {raw[:300]!r}")
        pinned = metric(ctx.prefill, KV_USAGE)
        # The sidecar now knows the decoder is down: the next request must not prefill at all.
        served_before = metric(ctx.prefill, SUCCESS)
        status2, _, _, raw2 = post_json(sc.port, "/v1/completions", completion_body(ctx.prompt("decoder still down"), 16),
                                        pd_headers(ctx.prefill))
        need(status2 == 502 and b"no prefill was sent" in raw2, f"second request: {status2} {raw2[:300]!r}")
        need(metric(ctx.prefill, SUCCESS) == served_before, "the prefiller served a prefill for a known-dead decoder")
        freed_s = ctx.wait_prefiller_kv_free(lease + 60)
        t_total = time.monotonic() - t0
        time.sleep(1.0)
        sidecar_log = sc.log.since()
    plog = ctx.plog.since()
    served = metric(ctx.prefill, SUCCESS) - pre_ok0
    aborts = metric(ctx.prefill, SUCCESS, finished_reason="abort") - pre_abort0
    self_xfers = metric(ctx.prefill, XFER) - pre_xfer0
    failed = metric(ctx.prefill, FAILED_XFER) - pre_fail0
    self_assert = next((l.strip() for l in plog.splitlines() if "Cannot register local engine" in l), None)
    handshake_failed = "handshake_failed" in plog
    expired = next((l.strip() for l in plog.splitlines() if "Releasing expired KV blocks" in l and rid in l), None)
    ctx.figures["decoder_down"] = {"freed_s": freed_s, "lease_s": lease, "expiry_s": expiry_s}
    findings.append(
        f"decoder port {dead} dead: sidecar 502; prefiller KV usage {pinned:.4f} right after, back to 0 after "
        + (f"{freed_s:.1f} s" if freed_s is not None else f"> {lease + 60} s (NOT freed)")
        + f"; prefiller finished {served:.0f} request(s) ({aborts:.0f} counted as abort), {XFER} +{self_xfers:.0f}, "
        f"{FAILED_XFER} +{failed:.0f}; sidecar warned that the blocks wait for lease expiry: "
        f"{'wait for their lease' in sidecar_log}")
    findings.append(f"prefiller attempted a NIXL handshake with itself (expected: no): {handshake_failed}"
                    + (f"; {self_assert[self_assert.index('AssertionError'):][:130]}" if self_assert and "AssertionError" in self_assert else ""))
    findings.append("blocks released by: " + ("lease expiry ('Releasing expired KV blocks ... retrieved by 0 remote worker(s)')"
                                             if expired else "no 'Releasing expired KV blocks' line for this request"))
    with open(os.path.join(ctx.args.logs, "decoder-down-prefill-log.txt"), "w") as f:
        f.write(plog)
    for f in findings:
        report("INFO", "decoder-down", f)

    # What must hold either way: the prefiller stays healthy, and its blocks are freed.
    status, _, _ = request(ctx.prefill, "GET", "/health", timeout=10)
    need(status == 200, f"prefiller /health {status} after the experiment")
    need(freed_s is not None, f"prefiller's blocks not freed within {lease + 60} s (t={t_total:.0f} s)")
    early = expiry_s is not None and freed_s < expiry_s / 2
    ctx.figures["decoder_down"]["early"] = early
    report("INFO", "decoder-down", "blocks " + (
        f"freed early ({freed_s:.1f} s vs {expiry_s:.1f} s by lease)" if early else
        f"held {freed_s:.1f} s, as long as the lease-expiry reference ({expiry_s:.1f} s): "
        "vLLM offers no earlier release"))
    return f"prefiller healthy, blocks freed after {freed_s:.1f} s (lease {lease:.0f} s)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("pull", "push"), default="pull",
                    help="the servers' connector: NixlConnector (pull) or NixlPushConnector (push)")
    ap.add_argument("--sidecar", required=True, help="path to llm-d-routing-sidecar")
    ap.add_argument("--prefill", type=int, required=True, help="prefiller's HTTP port on 127.0.0.1")
    ap.add_argument("--decode", type=int, required=True, help="decoder's HTTP port on 127.0.0.1")
    ap.add_argument("--logs", required=True, help="directory with prefill.log and decode.log; sidecar logs go here")
    ap.add_argument("--lease", type=float, default=30, help="the prefiller's KV lease, seconds")
    ap.add_argument("--figures", help="write measured figures here as JSON")
    ap.add_argument("--skip-decoder-down", "--skip-release", dest="skip_decoder_down", action="store_true",
                    help="skip the decoder-down check (it waits for a KV lease to expire, twice)")
    args = ap.parse_args()
    ctx = Ctx(args)
    tag = "nixlv2" if args.mode == "pull" else "nixlv2 (push)"

    check(f"vLLM is the version these checks expect ({EXPECTED_VLLM})", c_vllm_version, ctx)
    # The checks on one default sidecar; push runs the ones its pair is set up for.
    completion = ("P/D completion = plain, one hand-off", c_pd_completion)
    chat = ("P/D chat completion = plain, one hand-off", c_pd_chat)
    stream = ("P/D streaming", c_pd_stream)
    at_once = ("8 P/D requests at once", c_pd_concurrent)
    passthrough = ("pass-through without prefiller header", c_passthrough)
    if args.mode == "push":
        group = [completion, ("P/D of a 3-block prompt = plain, every block handed over", c_pd_multi_block),
                 chat, stream, at_once, passthrough]
    else:
        group = [completion, chat,
                 ("P/D /v1/responses = plain, one hand-off", c_pd_responses),
                 ("P/D /v1/messages = plain, one hand-off", c_pd_messages),
                 ("P/D /inference/v1/generate = plain, one hand-off", c_pd_generate),
                 stream, at_once,
                 ("client leaves mid-stream -> decoder aborts", c_client_leaves_mid_stream),
                 passthrough, ("latency", c_latency)]
    try:
        with ctx.sidecar("nixlv2") as sc:
            for name, fn in group:
                check(f"{tag}: {name}", fn, ctx, sc)
    except CheckFailed as e:
        report("FAIL", f"{tag} sidecar", str(e))
    if args.mode == "push":
        return finish(args, ctx)

    try:
        # The default -prefill-abandon-grace (500ms) lets a prefill that finishes soon run on and
        # hands its blocks to the decoder; how soon depends on the machine. 0 closes at once.
        with ctx.sidecar("nixlv2", extra=["-prefill-abandon-grace=0"]) as sc:
            check(f"{tag} -prefill-abandon-grace=0: client leaves during a long prefill -> prefiller aborts, KV freed",
                  c_client_leaves_during_prefill, ctx, sc)
    except CheckFailed as e:
        report("FAIL", "abandon-grace sidecar", str(e))

    try:
        # -v=5 (trace: the legs' bodies) on both, so that logging weighs the same on each TTFT.
        with ctx.sidecar("nixlv2", extra=["-tokenize-once=true", "-v=5"]) as once, \
                ctx.sidecar("nixlv2", extra=["-v=5"]) as sc:
            check("nixlv2 -tokenize-once: decoder reuses the prefill's token ids, output = plain, TTFT",
                  c_tokenize_once, ctx, once, sc)
    except CheckFailed as e:
        report("FAIL", "tokenize-once sidecars", str(e))

    try:
        with ctx.sidecar("nixl") as sc:
            try:
                report("INFO", "nixl (legacy): expected degradation, no P/D", c_legacy_nixl(ctx, sc))
            except CheckFailed as e:
                report("FAIL", "nixl (legacy): still answers like plain", str(e))
    except CheckFailed as e:
        report("FAIL", "nixl sidecar", str(e))

    report("SKIP", "client leaves after prefill, decode queued", "not provoked: the tiny model's decode is admitted in "
           "milliseconds, so the window cannot be hit reliably; vllm-sim tests (tests/cancel.rs) cover it")

    if args.skip_decoder_down:
        report("SKIP", "decoder-down", "--skip-decoder-down")
    else:
        check("decoder down after prefill -> 502, no further prefills, prefiller healthy, blocks freed",
              c_decoder_down, ctx)

    # After everything: both servers healthy, and P/D still works end to end.
    try:
        with ctx.sidecar("nixlv2") as sc:
            check("after all: P/D still works", c_pd_completion, ctx, sc)
    except CheckFailed as e:
        report("FAIL", "after all", str(e))
    return finish(args, ctx)


def finish(args, ctx):
    if args.figures:
        with open(args.figures, "w") as f:
            json.dump(ctx.figures, f, indent=2)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
