#!/usr/bin/env python3
"""`make e2e-vllm`, store pairs: the sidecar's `-connector=lmcache` flow (a one-token prefill,
then the client's request untouched to the decoder) in front of a real vLLM pair that shares
KV through a store both reach by the prompt's token prefix.

    store_checks.py --sidecar BIN --prefill PORT --decode PORT --logs DIR \\
        (--store example --dir DIR | --store lmcache-mp --lmcache-admin PORT)

- `example`: vLLM's ExampleConnector. Each server saves a new prompt's full 128-token blocks,
  the first (n-2)//128*128 tokens, as DIR/<hash of those tokens>/<layer>.safetensors, and loads
  them for a later prompt that starts with the same tokens. It saves in the step that first
  schedules a request, so a chunked prefill would store a partial KV: run.sh turns chunked
  prefill off for this pair.
- `lmcache-mp`: LMCache's multiprocess server, reached by both vLLM servers through
  LMCacheMPConnector; it keeps whole 256-token chunks in CPU memory and logs "Stored N tokens"
  / "Retrieved N tokens". The admin port clears it (POST /cache/clear).

Both servers run with prefix caching off, so the connector is a server's only way to skip
prompt tokens. The proof of a hand-off: the decoder's
vllm:prompt_tokens_by_source_total{source="external_kv_transfer"} (and
vllm:external_prefix_cache_hits_total) rose by exactly the stored tokens, the store shows what
the prefiller put in it and the decoder took out, and the greedy text equals the same request
sent plainly to the decoder after the store was emptied (a full recompute). With `example`, a
tamper check swaps one prompt's stored KV for another's and sees the answer change.

Prints one line per check and "N passed, N failed, N skipped"; exit status 1 on a failure.
"""
import argparse
import json
import os
import re
import shutil
import sys
import time

from common import (BY_SOURCE, EXPECTED_VLLM, MODEL, SUCCESS, CheckFailed, Log, Sidecar, Stream,
                    c_vllm_version, chat_body, check, completion_body, free_port, metric, need, pd_at_once, pd_headers, post_json, report,
                    request, summary, text_of, wait_for)

EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
MIN_TOKENS = 300  # over two 128-token blocks and one 256-token chunk: both stores share something

SENTENCES = [
    "San Francisco is a city on a bay, and the fog comes in over the hills.",
    "A prefill server computes the prompt; a decode server generates the answer.",
    "The sidecar routes each request to the prefiller first, then to the decoder.",
    "Paged attention keeps the key and value cache in fixed-size blocks.",
]
# Unrelated text for the tamper check's other prompt, so that its KV differs everywhere.
UNRELATED = [
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "Punctuation and symbols: . , ; : ! ? ' ( ) [ ] { } < > - _ = + * /",
]


class ExampleStore:
    """vLLM's ExampleConnector: a directory of <token hash>/<layer>.safetensors."""

    name = "example"

    def __init__(self, args):
        self.dir = args.dir
        self.dlog = Log(os.path.join(args.logs, "decode.log"))
        self.before = set()

    @staticmethod
    def stored_tokens(n):
        return (n - 2) // 128 * 128

    def entries(self):
        return {e for e in os.listdir(self.dir) if os.path.isdir(os.path.join(self.dir, e))}

    def wipe(self):
        for e in self.entries():
            shutil.rmtree(os.path.join(self.dir, e))

    def mark(self):
        self.before = self.entries()
        self.dlog.mark()

    def evidence(self, want, count=1):
        new = self.entries() - self.before
        need(len(new) == count, f"{len(new)} new KV folder(s) in the store, expected {count}")
        files = sorted(os.listdir(os.path.join(self.dir, next(iter(new)))))
        log = self.dlog.since()
        injected = [int(x) for x in re.findall(r"Inject KV cache of (\d+) tokens", log)]
        need(log.count("External Cache Hit!") >= count, "no 'External Cache Hit!' in the decoder log")
        need(len(injected) == count and set(injected) == {want}, f"decoder log 'Inject KV cache of N tokens': {injected}")
        return f"store +{count} folder(s) of {len(files)} files ({', '.join(files)}); decoder log 'Inject KV cache of {want} tokens'"


class LMCacheMPStore:
    """LMCache's multiprocess server (its L1 in CPU memory), cleared over its admin API."""

    name = "lmcache-mp"

    def __init__(self, args):
        self.admin = args.lmcache_admin
        self.log = Log(os.path.join(args.logs, "lmcache-server.log"))

    @staticmethod
    def stored_tokens(n):
        return n // 256 * 256

    def wipe(self):
        status, _, raw = request(self.admin, "POST", "/cache/clear", {})
        need(status == 200, f"LMCache POST /cache/clear: {status} {raw[:200]!r}")

    def mark(self):
        self.log.mark()

    def evidence(self, want, count=1):
        def totals():
            log = self.log.since()
            return ([int(x) for x in re.findall(r"Stored (\d+) tokens", log)],
                    [int(x) for x in re.findall(r"Retrieved (\d+) tokens", log)])
        # The server logs a moment after the engines move on.
        wait_for(lambda: sum(totals()[1]) >= want * count, 5, 0.1)
        stored, retrieved = totals()
        need(sum(stored) == want * count, f"LMCache server stored {stored}, expected {count} x {want} tokens")
        need(sum(retrieved) == want * count, f"LMCache server retrieved {retrieved}, expected {count} x {want} tokens")
        return f"LMCache server log 'Stored {stored[0]} tokens', then 'Retrieved {retrieved[0]} tokens' (x{count})"


class Ctx:
    def __init__(self, args):
        self.args = args
        self.prefill, self.decode = args.prefill, args.decode
        self.store = ExampleStore(args) if args.store == "example" else LMCacheMPStore(args)
        self.n = 0

    def sidecar(self, extra=(), vllm_port=None):
        return Sidecar(self.args.sidecar, "lmcache", vllm_port or self.decode, self.args.logs, extra)

    def prompt(self, what, sentences=SENTENCES, min_tokens=MIN_TOKENS):
        """A fresh prompt (its number comes first, so its token prefix is new) of min_tokens or more."""
        self.n += 1
        text = f"Request {self.n} ({what}):"
        for i in range(200):
            status, _, reply, raw = post_json(self.decode, "/tokenize", {"model": MODEL, "prompt": text})
            need(status == 200, f"/tokenize: {status} {raw[:200]!r}")
            if reply["count"] >= min_tokens:
                return text, reply["count"]
            text += " " + sentences[i % len(sentences)]
        raise CheckFailed(f"no prompt of {min_tokens} tokens")

    def sources(self):
        return (metric(self.decode, BY_SOURCE, source="external_kv_transfer"),
                metric(self.decode, BY_SOURCE, source="local_compute"), metric(self.decode, EXTERNAL_HITS))

    def recompute(self, path, body):
        """The same request sent plainly to the decoder with the store emptied: a full recompute."""
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        self.store.wipe()
        ext0 = self.sources()[0]
        status, _, reply, raw = post_json(self.decode, path, body)
        need(status == 200, f"plain request: {status} {raw[:300]!r}")
        need(self.sources()[0] == ext0, "the plain reference loaded KV from the store: not a recompute")
        return text_of(reply)


def streamed_text(port, path, body, headers):
    s = Stream(port, path, body, headers)
    try:
        need(s.status == 200, f"sidecar answered {s.status}")
        need(s.headers.get("content-type", "").startswith("text/event-stream"), "not an event stream")
        pieces = []
        for data in s.events():
            if data == "[DONE]":
                return pieces
            choice = (json.loads(data).get("choices") or [{}])[0]
            pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
        raise CheckFailed("no [DONE]")
    finally:
        s.close()


def pd_once(ctx, sc, path, what, stream=False):
    prompt, n = ctx.prompt(what)
    want = ctx.store.stored_tokens(n)
    body = chat_body(prompt) if path.endswith("chat/completions") else completion_body(prompt)
    if stream:
        body["stream"] = True
    ctx.store.mark()
    before = ctx.sources()
    served0 = metric(ctx.prefill, SUCCESS)
    t0 = time.perf_counter()
    if stream:
        pieces = streamed_text(sc.port, path, body, pd_headers(ctx.prefill))
        text = "".join(pieces)
    else:
        status, _, reply, raw = post_json(sc.port, path, body, pd_headers(ctx.prefill))
        need(status == 200, f"sidecar answered {status}: {raw[:400]!r}")
        text = text_of(reply)
    ms = (time.perf_counter() - t0) * 1e3
    need(metric(ctx.prefill, SUCCESS) - served0 >= 1, "the prefiller served no request")
    ext, local, hits = (a - b for a, b in zip(ctx.sources(), before))
    where = ctx.store.evidence(want)
    need(ext == want and hits == want,
         f"decoder external_kv_transfer +{ext:.0f}, {EXTERNAL_HITS} +{hits:.0f}, expected +{want} ({n}-token prompt)")
    plain = ctx.recompute(path, body)
    need(text == plain, f"P/D text {text!r} != plain recompute {plain!r}")
    more = f", {len(pieces)} SSE content events" if stream else ""
    return (f"{n}-token prompt: decoder {BY_SOURCE} external_kv_transfer +{ext:.0f}, local_compute +{local:.0f}; "
            f"{where}; text = plain recompute{more}; {ms:.0f} ms")


def c_completion(ctx, sc):
    return pd_once(ctx, sc, "/v1/completions", "completion")


def c_chat(ctx, sc):
    return pd_once(ctx, sc, "/v1/chat/completions", "chat")


def c_stream(ctx, sc):
    return pd_once(ctx, sc, "/v1/completions", "stream", stream=True)


def c_tamper(ctx, sc):
    """B's stored KV replaced by unrelated A's (same stored length): the decoder's answer for B
    changes, so it really decodes from the store."""
    st = ctx.store
    a, na = ctx.prompt("tamper A", UNRELATED)
    b, nb = ctx.prompt("tamper B")
    need(st.stored_tokens(na) == st.stored_tokens(nb), f"A ({na}) and B ({nb}) store different lengths")
    folder = {}
    for key, p in (("a", a), ("b", b)):
        before = st.entries()
        status, _, _, raw = post_json(ctx.prefill, "/v1/completions", completion_body(p, 1))
        need(status == 200, f"prefill of {key.upper()}: {status} {raw[:200]!r}")
        new = st.entries() - before
        need(len(new) == 1, f"the prefill of {key.upper()} wrote {len(new)} folders")
        folder[key] = os.path.join(st.dir, new.pop())
    for f in os.listdir(folder["a"]):
        shutil.copyfile(os.path.join(folder["a"], f), os.path.join(folder["b"], f))
    # The sidecar's own prefill of B finds B's (now A's) entry and stores nothing new.
    body = completion_body(b)
    status, _, reply, raw = post_json(sc.port, "/v1/completions", body, pd_headers(ctx.prefill))
    need(status == 200, f"sidecar: {status} {raw[:200]!r}")
    tampered = text_of(reply)
    plain_b = ctx.recompute("/v1/completions", body)
    need(tampered != plain_b, f"the answer for B did not change over A's KV: {tampered!r}")
    return f"B ({nb} tokens) over A's stored KV: {tampered!r}; B recomputed: {plain_b!r}"


def c_concurrent(ctx, sc, n=8, max_tokens=8):
    """n P/D requests at once (more prompt tokens than one engine step takes). Eight tokens each:
    the random model's answers are near-ties, and bf16 batch numerics (a prompt prefilled in a
    batch of six vs alone) flip one around the 12th token; a store holding the wrong KV (the
    ExampleConnector bug with chunked prefill) differs from the second token on."""
    prompts = [ctx.prompt(f"concurrent {i}") for i in range(n)]
    ctx.store.mark()
    ext0 = ctx.sources()[0]

    texts, wall = pd_at_once(sc.port, ctx.prefill, "/v1/completions",
                             [completion_body(p, max_tokens) for p, _ in prompts])
    ext = ctx.sources()[0] - ext0
    want = [ctx.store.stored_tokens(c) for _, c in prompts]
    need(ext == sum(want), f"decoder external_kv_transfer +{ext:.0f}, expected +{sum(want)}")
    need(len(set(want)) == 1, f"prompts store different lengths: {want}")
    ctx.store.evidence(want[0], n)
    plain = [ctx.recompute("/v1/completions", completion_body(p, max_tokens)) for p, _ in prompts]
    bad = [f"#{i}: {t!r} != plain {r!r}" for i, (t, r) in enumerate(zip(texts, plain)) if t != r]
    need(not bad, f"P/D text != plain recompute for {len(bad)} of {n}: {'; '.join(bad)}")
    return f"{n} at once ({sum(c for _, c in prompts)} prompt tokens) in {wall:.2f} s: external +{ext:.0f}, every text = plain"


def c_passthrough(ctx, sc):
    prompt, _ = ctx.prompt("pass-through")
    served0 = metric(ctx.prefill, SUCCESS)
    ext0 = ctx.sources()[0]
    status, _, reply, raw = post_json(sc.port, "/v1/completions", completion_body(prompt))
    need(status == 200, f"{status} {raw[:200]!r}")
    time.sleep(0.5)
    need(metric(ctx.prefill, SUCCESS) == served0, "a request without the prefiller header reached the prefiller")
    need(ctx.sources()[0] == ext0, "a request without the prefiller header loaded KV from the store")
    return "no prefiller header: the decoder alone, prefiller untouched, nothing from the store"


def c_prefiller_down(ctx, sc_unused):
    """A prefiller nobody listens on: -prefill-failure-policy=error answers 502;
    decode-local serves the request from the decoder alone and says so."""
    dead = {"x-prefiller-host-port": f"127.0.0.1:{free_port()}"}
    prompt, _ = ctx.prompt("prefiller down")
    body = completion_body(prompt)
    with ctx.sidecar(["-prefill-failure-policy=error"]) as sc:
        status, hdrs, _, raw = post_json(sc.port, "/v1/completions", body, dead)
        need(status == 502, f"policy error: {status} {raw[:200]!r}")
    with ctx.sidecar(["-prefill-failure-policy=decode-local"]) as sc:
        status, hdrs, reply, raw = post_json(sc.port, "/v1/completions", body, dead)
        need(status == 200, f"policy decode-local: {status} {raw[:200]!r}")
        need(hdrs.get("x-prefill-fallback") == "decode-local", f"x-prefill-fallback: {hdrs.get('x-prefill-fallback')}")
        text = text_of(reply)
    plain = ctx.recompute("/v1/completions", body)
    need(text == plain, f"decode-local text {text!r} != plain {plain!r}")
    return "policy error -> 502; decode-local -> 200, x-prefill-fallback: decode-local, text = plain"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sidecar", required=True, help="path to llm-d-routing-sidecar")
    ap.add_argument("--prefill", type=int, required=True, help="prefiller's HTTP port on 127.0.0.1")
    ap.add_argument("--decode", type=int, required=True, help="decoder's HTTP port on 127.0.0.1")
    ap.add_argument("--logs", required=True, help="directory with the servers' logs; sidecar logs go here")
    ap.add_argument("--store", choices=("example", "lmcache-mp"), required=True)
    ap.add_argument("--dir", help="example: the connector's shared_storage_path")
    ap.add_argument("--lmcache-admin", type=int, help="lmcache-mp: the LMCache server's HTTP admin port")
    args = ap.parse_args()
    ctx = Ctx(args)
    tag = f"lmcache ({args.store})"
    check(f"vLLM is the version these checks expect ({EXPECTED_VLLM})", c_vllm_version, ctx)
    try:
        with ctx.sidecar() as sc:
            check(f"{tag}: P/D completion = plain recompute, KV from the store", c_completion, ctx, sc)
            check(f"{tag}: P/D chat completion = plain recompute, KV from the store", c_chat, ctx, sc)
            check(f"{tag}: P/D streaming = plain recompute, KV from the store", c_stream, ctx, sc)
            if args.store == "example":  # LMCache's entries cannot be swapped by hand
                check(f"{tag}: the decoder decodes from the stored KV (tamper)", c_tamper, ctx, sc)
            check(f"{tag}: 8 P/D requests at once", c_concurrent, ctx, sc)
            check(f"{tag}: pass-through without prefiller header", c_passthrough, ctx, sc)
            check(f"{tag}: prefiller down -> 502, or decode-local", c_prefiller_down, ctx, sc)
    except CheckFailed as e:
        report("FAIL", f"{tag} sidecar", str(e))
    return summary()


if __name__ == "__main__":
    sys.exit(main())
