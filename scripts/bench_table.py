#!/usr/bin/env python3
"""Turns the JSON lines of scripts/bench.sh into the results table (markdown).

Every sidecar figure is shown next to the direct baseline measured in the same run, and as a
ratio to it. Targets come from issue 6; absolute ones were set on a machine where the load side
served ~40k req/s on one core, so the ratio column is the portable figure.
"""
import json
import platform
import statistics
import subprocess
import sys
import time


def load(path):
    """One record per (scenario, side): the median of each figure over the repeated runs,
    and the totals of requests, CPU and wall time (for CPU per request)."""
    groups = {}
    for line in open(path):
        line = line.strip()
        if line:
            r = json.loads(line)
            groups.setdefault((r["scenario"], r["side"]), []).append(r)
    runs = {}
    for key, rs in groups.items():
        merged = dict(rs[-1])
        for k in ("rps", "lat_p50_ms", "lat_p99_ms", "ttfb_p50_ms", "ttfb_p99_ms"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                merged[k] = statistics.median(vals)
        for k in ("ok", "warmup", "errors", "non2xx", "bad_stream", "sidecar_cpu_s", "wall_s"):
            if all(k in r for r in rs):
                merged[k] = sum(r[k] for r in rs)
        merged["runs"] = len(rs)
        runs[key] = merged
    return runs


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_rev():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - best effort
        return "?"


def fmt(x, unit):
    if x is None:
        return "n/a"
    if unit == "/s":
        return f"{x:,.0f}/s"
    if unit == "ms":
        return f"{x:.3f} ms"
    if unit == "KiB":
        return f"{x:,.1f} KiB"
    return f"{x}"


def main():
    runs = load(sys.argv[1])
    extra_args = sys.argv[2] if len(sys.argv) > 2 else ""
    max_secs = sys.argv[3] if len(sys.argv) > 3 else "?"
    rows = []
    notes = []
    cpu_rows = []

    def pair(scenario):
        return runs.get((scenario, "direct")), runs.get((scenario, "sidecar"))

    def row(scenario, metric, unit, key, target=None, check=None):
        d, s = pair(scenario)
        if not d or not s:
            return
        dv, sv = d.get(key), s.get(key)
        ratio = f"{sv / dv:.2f}x" if dv and sv is not None else "n/a"
        verdict = ""
        if check is not None and dv is not None and sv is not None:
            verdict = "pass" if check(dv, sv) else "FAIL"
        rows.append((f"{scenario} {metric}", fmt(dv, unit), fmt(sv, unit), ratio,
                     target or "", verdict))

    for scenario in ("pd_c1", "pd_c1_busy", "pd_c16", "pd_c64", "pass_c16", "stream_c16", "big400k_c4"):
        d, s = pair(scenario)
        if not d or not s:
            continue
        for r in (d, s):
            bad = r["errors"] + r["non2xx"] + r["bad_stream"]
            if bad:
                notes.append(f"{scenario}/{r['side']}: {bad} failed requests")
        done = s["ok"] + s.get("warmup", 0)
        if done and s.get("wall_s"):
            us = s["sidecar_cpu_s"] / done * 1e6
            busy = s["sidecar_cpu_s"] / s["wall_s"]
            cpu_rows.append((scenario, f"{us:.0f} us", f"{busy:.0%}",
                             f"{1e6 / us:,.0f}/s" if us else "n/a"))

    row("pd_c1", "req/s", "/s", "rps")
    row("pd_c1", "p50", "ms", "lat_p50_ms", "added <= 0.15 ms",
        lambda d, s: s - d <= 0.15)
    row("pd_c1", "p99", "ms", "lat_p99_ms")
    row("pd_c1_busy", "p50 (-busy-poll)", "ms", "lat_p50_ms", "added <= 0.15 ms",
        lambda d, s: s - d <= 0.15)
    row("pd_c1_busy", "p99 (-busy-poll)", "ms", "lat_p99_ms")
    row("pd_c16", "req/s", "/s", "rps")
    row("pd_c16", "p50", "ms", "lat_p50_ms")
    row("pd_c16", "p99", "ms", "lat_p99_ms")
    row("pd_c64", "req/s", "/s", "rps", ">= 15k/s", lambda d, s: s >= 15000)
    row("pd_c64", "p50", "ms", "lat_p50_ms")
    row("pd_c64", "p99", "ms", "lat_p99_ms")
    row("pass_c16", "req/s", "/s", "rps", ">= 0.8x direct (nginx <= direct)",
        lambda d, s: s >= 0.8 * d)
    row("pass_c16", "p50", "ms", "lat_p50_ms")
    row("stream_c16", "streams/s", "/s", "rps", ">= 8k/s", lambda d, s: s >= 8000)
    row("stream_c16", "TTFB p50", "ms", "ttfb_p50_ms")
    row("stream_c16", "TTFB p99", "ms", "ttfb_p99_ms")
    row("big400k_c4", "req/s", "/s", "rps")
    row("big400k_c4", "p50", "ms", "lat_p50_ms", "added <= 1 ms", lambda d, s: s - d <= 1.0)
    row("big400k_c4", "p99", "ms", "lat_p99_ms")

    mem = runs.get(("idle_streams", "sidecar"))
    if mem and mem["open"]:
        per = (mem["rss1_kib"] - mem["rss0_kib"]) / mem["open"]
        rows.append((f"idle_streams ({mem['open']} open) RSS/stream", "",
                     fmt(per, "KiB"), "", "<= 64 KiB",
                     "pass" if per <= 64 else "FAIL"))
        notes.append(f"idle_streams: sidecar VmRSS {mem['rss0_kib']:,} KiB before, "
                     f"{mem['rss1_kib']:,} KiB with {mem['open']} streams open: "
                     f"{per * 1000 / 1024:.1f} MiB per 1,000 idle streams")

    out = []
    out.append(f"sidecar bench, {time.strftime('%Y-%m-%d %H:%M')}, git {git_rev()}, "
               f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} "
               f"x {cpu_model()}, MAX_SECS={max_secs}, medians of "
               f"{max((r.get('runs', 1) for r in runs.values()), default=1)} runs"
               + (f", sidecar flags: {extra_args}" if extra_args.strip() else ""))
    out.append("")
    header = ("scenario", "direct", "sidecar", "ratio", "target", "")
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        out.append("| " + " | ".join(r) + " |")
    if cpu_rows:
        out.append("")
        out.append("Sidecar CPU (through-sidecar runs): CPU time per request, share of its core "
                   "in use, and the implied capacity of one full core (1 / CPU per request). "
                   "A core well below 100% means the load side (client + fake workers on the "
                   "other core) was the limit, not the sidecar.")
        out.append("")
        out.append("| scenario | sidecar CPU/request | sidecar core busy | one-core capacity |")
        out.append("|---|---|---|---|")
        for r in cpu_rows:
            out.append("| " + " | ".join(r) + " |")
    out.append("")
    for n in notes:
        out.append(f"- {n}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
