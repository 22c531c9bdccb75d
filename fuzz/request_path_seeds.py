#!/usr/bin/env python3
"""Writes the hand-made seeds of the request_path fuzz target into fuzz/corpus/request_path/.

Each seed is a mode byte (0: the client stays for the answer, 1: it leaves once the bytes are
out) and the bytes of a client connection; `$P` stands for the prefiller (see request_path.rs).
"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "request_path")


def h1(method, path, body=b"", headers=(), pd=True, length=True):
    lines = [f"{method} {path} HTTP/1.1", "host: sidecar"]
    if pd:
        lines.append("x-prefiller-host-port: $P")
    if body:
        lines.append("content-type: application/json")
    if length:
        lines.append(f"content-length: {len(body)}")
    lines += list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body, size=7):
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name, value):
    # Literal header field without indexing, new name, no Huffman coding.
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def h2(path, body, pd=True):
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
               (b":authority", b"sidecar"), (b"content-type", b"application/json")]
    if pd:
        headers.append((b"x-prefiller-host-port", b"$P"))
    block = b"".join(hpack_literal(n, v) for n, v in headers)
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"")
            + h2_frame(1, 4, 1, block) + h2_frame(0, 1, 1, body))


COMPLETION = b'{"model":"sim-model","prompt":"fuzz seed","max_tokens":3}'
CHAT_STREAM = (b'{"model":"sim-model","messages":[{"role":"user","content":"hi"}],'
               b'"stream":true,"max_tokens":3}')

SEEDS = {
    "pd_completion": h1("POST", "/v1/completions", COMPLETION),
    "pd_chat_stream": h1("POST", "/v1/chat/completions", CHAT_STREAM),
    "pd_chunked_body": h1("POST", "/v1/completions", b"", ["transfer-encoding: chunked"],
                          length=False) + chunked(COMPLETION),
    "pd_bad_json": h1("POST", "/v1/completions", b'{"prompt":"x",'),
    "pd_not_object": h1("POST", "/v1/completions", b"[1,2]"),
    "pd_oversized": h1("POST", "/v1/completions",
                       b'{"prompt":"' + b"x" * (17 * 1024) + b'"}'),
    "pd_bad_prefiller": h1("POST", "/v1/completions", COMPLETION, pd=False,
                           headers=["x-prefiller-host-port: http://p:1/x?y"]),
    "pd_prefiller_url": h1("POST", "/v1/completions", COMPLETION, pd=False,
                           headers=["x-prefiller-url: http://$P"]),
    "pd_fault_prefill_503": h1("POST", "/v1/completions", COMPLETION,
                               ["x-sim-fault: prefill_http_503"]),
    "pd_fault_decode_500": h1("POST", "/v1/completions", COMPLETION,
                              ["x-sim-fault: decode_http_500"]),
    "pd_fault_stall": h1("POST", "/v1/chat/completions", CHAT_STREAM,
                         ["x-sim-fault: stall_ms:1500"]),
    "pd_fault_drop_stream": h1("POST", "/v1/chat/completions", CHAT_STREAM,
                               ["x-sim-fault: drop_after_tokens:1"]),
    "pd_expect_continue": h1("POST", "/v1/completions", COMPLETION,
                             ["expect: 100-continue"]),
    "pd_pipelined": h1("POST", "/v1/completions", COMPLETION) * 2
    + h1("GET", "/v1/models", pd=False),
    "passthrough_models": h1("GET", "/v1/models", pd=False),
    "passthrough_head": h1("HEAD", "/v1/models", pd=False),
    "health": h1("GET", "/health", pd=False),
    "cl_and_te": h1("POST", "/v1/completions", b"", ["transfer-encoding: chunked"],
                    length=False).replace(b"\r\n\r\n", b"\r\ncontent-length: 5\r\n\r\n", 1)
    + chunked(COMPLETION),
    "te_gzip_chunked": h1("POST", "/v1/completions", b"", ["transfer-encoding: gzip, chunked"],
                          length=False) + chunked(COMPLETION),
    "many_headers": h1("GET", "/v1/models", pd=False,
                       headers=[f"x-h{i}: {'v' * 20}" for i in range(300)]),
    "partial_head": b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-le",
    "short_body": h1("POST", "/v1/completions", COMPLETION)[:-10],
    "garbage": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n",
    "h2_pd_completion": h2(b"/v1/completions", COMPLETION),
    "h2_passthrough": h2(b"/v1/models", b"", pd=False),
    "h2_preface_only": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        for mode, how in ((0, "stay"), (1, "leave")):
            with open(os.path.join(OUT, f"seed_{name}_{how}"), "wb") as f:
                f.write(bytes([mode]) + data)


if __name__ == "__main__":
    main()
