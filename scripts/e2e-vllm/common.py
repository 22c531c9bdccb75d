"""What every `make e2e-vllm` check script shares: loopback HTTP with a timeout on every request,
vLLM's Prometheus metrics, server logs read from a mark, the sidecar process, SSE streams,
request bodies, and the PASS/FAIL/SKIP report. Stdlib only."""
import concurrent.futures
import http.client
import json
import os
import re
import socket
import subprocess
import time

TIMEOUT = 60.0  # seconds, any single HTTP request
MODEL = "tiny"

EXPECTED_VLLM = "0.32.0"  # what these checks were written against (the decoder's GET /version)
MIN_PROMPT_TOKENS = 64  # newer vLLM recomputes, instead of transferring, prompts under kv_recompute_threshold
# Decoder-side proof of a hand-off, whatever the connector: prompt tokens whose KV came from elsewhere.
BY_SOURCE = "vllm:prompt_tokens_by_source_total"
EXTERNAL = BY_SOURCE
EXTERNAL_LABELS = {"source": "external_kv_transfer"}
KV_USAGE = "vllm:kv_cache_usage_perc"
SUCCESS = "vllm:request_success_total"
GEN_TOKENS = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"

RESULTS = []  # (status, name, detail)


def report(status, name, detail=""):
    RESULTS.append((status, name, detail))
    print(f"{status:5} {name}" + (f": {detail}" if detail else ""), flush=True)


class CheckFailed(Exception):
    pass


class CheckSkipped(Exception):
    """The vLLM under test does not serve what the check needs (the reason says exactly why)."""


def need(cond, msg):
    if not cond:
        raise CheckFailed(msg)



# ---------------------------------------------------------------- HTTP helpers


def request(port, method, path, body=None, headers=None, timeout=TIMEOUT):
    """One request on a fresh connection: (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"content-type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(port, path, body, headers=None, timeout=TIMEOUT):
    status, hdrs, raw = request(port, "POST", path, body, headers, timeout)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    return status, hdrs, parsed, raw


def pd_headers(prefill_port):
    return {"x-prefiller-host-port": f"127.0.0.1:{prefill_port}"}


def text_of(reply):
    choice = reply["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def metrics(port):
    """Prometheus text -> list of (name, labels, value)."""
    _, _, raw = request(port, "GET", "/metrics", timeout=10)
    out = []
    for line in raw.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(4))))
        except ValueError:
            pass
    return out


def metric(port, name, **labels):
    """Sum of every sample of `name` whose labels include `labels`."""
    return sum(v for n, l, v in metrics(port) if n == name and all(l.get(k) == w for k, w in labels.items()))


def wait_for(pred, timeout, interval=0.2):
    """Polls pred() until it returns a truthy value or timeout s pass; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def pd_at_once(port, prefill_port, path, bodies):
    """Sends every body as a P/D request through the sidecar at `port`, all at once; returns
    their output texts (in order) and the wall time in seconds. Each must answer 200."""
    def one(body):
        status, _, reply, raw = post_json(port, path, body, pd_headers(prefill_port))
        need(status == 200, f"{status} {raw[:200]!r}")
        return text_of(reply)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        texts = list(pool.map(one, bodies))
    return texts, time.perf_counter() - t0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Log:
    """A server log file; mark() then since() gives only what was written in between."""

    def __init__(self, path):
        self.path = path
        self.offset = 0

    def mark(self):
        self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def since(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")


# ---------------------------------------------------------------- the sidecar


class Sidecar:
    """One sidecar process on 127.0.0.1 (port picked by the OS), stopped on exit."""

    started = 0

    def __init__(self, binary, connector, vllm_port, logdir, extra=()):
        Sidecar.started += 1
        self.name = f"sidecar{Sidecar.started}-{connector}-vllm{vllm_port}"
        self.log_path = os.path.join(logdir, self.name + ".log")
        self.log = Log(self.log_path)
        self.args = [
            binary, "-port=0", "-bind-address=127.0.0.1", "-vllm-host=127.0.0.1",
            f"-vllm-port={vllm_port}", f"-connector={connector}", "-v=4", *extra,
        ]
        self.proc = None
        self.port = None

    def __enter__(self):
        self.logf = open(self.log_path, "wb")
        # The readiness line ({"event":"listening","port":N}) comes on stdout; logs on stderr.
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.logf)
        line = self.proc.stdout.readline() if self.proc.stdout else b""
        try:
            event = json.loads(line)
        except ValueError:
            event = {}
        if event.get("event") == "listening":
            self.port = int(event["port"])
            return self
        self.__exit__(None, None, None)
        raise CheckFailed(f"{self.name} did not start; log {self.log_path}")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.logf.close()


# ---------------------------------------------------------------- SSE streaming


class Stream:
    """A streaming request read event by event; close() drops the connection."""

    def __init__(self, port, path, body, headers, timeout=TIMEOUT):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        hdrs = {"content-type": "application/json"}
        hdrs.update(headers)
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers=hdrs)
        self.resp = self.conn.getresponse()
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.status = self.resp.status

    def events(self):
        """Yields each `data:` payload (str) as it arrives."""
        while True:
            line = self.resp.readline()
            if not line:
                return
            line = line.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip().decode()

    def close(self):
        # Closing the socket, not just the response, is what a departing client does.
        if self.conn.sock is not None:
            self.conn.sock.close()
        self.conn.close()



def completion_body(prompt, max_tokens=16, **extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body.update(extra)
    return body


def chat_body(prompt, max_tokens=16, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    body.update(extra)
    return body


def check(name, fn, *a):
    try:
        detail = fn(*a)
        report("PASS", name, detail or "")
    except CheckFailed as e:
        report("FAIL", name, str(e))
    except CheckSkipped as e:
        report("SKIP", name, str(e))
    except Exception as e:  # a crash in a check is a failure of that check, not of the run
        report("FAIL", name, f"{type(e).__name__}: {e}")


def c_vllm_version(ctx):
    status, _, raw = request(ctx.decode, "GET", "/version", timeout=10)
    need(status == 200, f"decoder GET /version: {status} {raw[:200]!r}")
    version = json.loads(raw).get("version")
    need(version == EXPECTED_VLLM, f"these checks expect vLLM {EXPECTED_VLLM}; the decoder runs {version!r}: "
                                   "re-verify the routes, metrics and log lines they rely on before changing EXPECTED_VLLM")
    return f"decoder /version {version}"



def summary():
    """Prints the closing "N passed, N failed, N skipped" line; the exit status for the script."""
    counts = {s: sum(1 for r in RESULTS if r[0] == s) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0
