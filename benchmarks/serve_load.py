"""Bounded local load test of ``nanollada serve``: C concurrent clients x R requests on 127.0.0.1.

    python benchmarks/serve_load.py --ckpt logs/tiny_ar_sft/checkpoints/last.ckpt --clients 8 --requests 20

Starts ``nanollada serve`` as a subprocess on a free loopback port (or targets ``--url http://127.0.0.1:PORT`` of a
running one: loopback addresses only), sends ``clients x requests`` chat completions (every other one streaming, each with
its own prompt and seed, spread over the served models), then replays every request alone, one at a time, and
compares texts: a request whose concurrent text differs from its solo text is a *mixed output*. Prints requests/s,
latency p50 / p95 / max, completion tokens/s, errors and mixed outputs as a markdown row (``--json`` for all of it).
Every request has a timeout and the run a fixed count, so it always ends.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

TOPICS = ["cats", "the sea", "rain", "bread", "trains", "winter", "music", "gardens", "the moon", "rivers",
          "books", "tea", "bees", "mountains", "snow", "bicycles", "owls", "clocks", "maps", "lanterns"]


def request(host: str, port: int, body: dict, timeout: float) -> tuple[str, int, float]:
    """(text, completion tokens, seconds) of one chat completion, streamed or not; raises on any error."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
        if not body.get("stream"):
            out = json.loads(r.read())
            return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"], \
                time.perf_counter() - start
        text, tokens, done = [], 0, False
        for raw in r.read().decode("utf-8").split("\n\n"):
            if not raw.startswith("data: "):
                continue
            data = raw[6:]
            if data == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if ev.get("choices"):
                text.append(ev["choices"][0]["delta"].get("content") or "")
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        return "".join(text), tokens, time.perf_counter() - start
    finally:
        conn.close()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", action="append", default=[], help="checkpoint to serve (NAME=PATH or PATH; repeat)")
    ap.add_argument("--url", default=None, help="target a running server instead (loopback only)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    ap.add_argument("--json", default=None, help="write every number (and per-request latencies) here")
    a = ap.parse_args(argv)
    if a.clients < 1 or a.requests < 1 or a.clients * a.requests > 10_000:
        raise SystemExit("clients and requests must be >= 1, and at most 10000 requests in all")
    server = None
    if a.url:
        u = urlparse(a.url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--url must be a loopback address (127.0.0.1 / localhost)")
        host, port = u.hostname, u.port or 80
    else:
        if not a.ckpt:
            raise SystemExit("give --ckpt PATH (one or more) or --url of a running server")
        server, host, port = start_serve(a.ckpt, a.max_tokens, a.threads)
    try:
        return run(a, host, port)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def start_serve(ckpts: list[str], max_tokens: int, threads: int) -> tuple[subprocess.Popen, str, int]:
    """``nanollada serve`` in its own process on a free 127.0.0.1 port (so clients and server do not share a GIL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, "-m", "nanollada", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--max_new_tokens", str(max_tokens)]
    for c in ckpts:
        args += ["--ckpt", c]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = tempfile.TemporaryFile(mode="w+")  # the server's output, read back only if it fails to start
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"nanollada serve exited: {log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, "127.0.0.1", port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("nanollada serve did not come up within 300 s")


def run(a, host: str, port: int) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/v1/models")
    models = [m["id"] for m in json.loads(conn.getresponse().read())["data"]]
    conn.close()

    specs = []
    for c in range(a.clients):
        for i in range(a.requests):
            k = c * a.requests + i
            specs.append({"model": models[k % len(models)], "max_tokens": a.max_tokens, "seed": k,
                          "temperature": 1.0, "stream": k % 2 == 1,
                          "messages": [{"role": "user", "content": f"Tell me about {TOPICS[k % len(TOPICS)]}."}]})
    results: list = [None] * len(specs)
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(a.requests):
            k = c * a.requests + i
            try:
                res = request(host, port, specs[k], a.timeout)
            except Exception as e:  # noqa: BLE001  (counted, reported)
                res = e
            with lock:
                results[k] = res

    start = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        list(pool.map(client, range(a.clients)))
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, Exception)]
    ok = [(k, r) for k, r in enumerate(results) if not isinstance(r, Exception)]
    solo_start = time.perf_counter()
    mixed = sum(request(host, port, specs[k], a.timeout)[0] != text for k, (text, _, _) in ok)
    solo = time.perf_counter() - solo_start
    lat = [r[2] for _, r in ok]
    tokens = sum(r[1] for _, r in ok)
    out = {"models": models, "clients": a.clients, "requests": len(specs), "max_tokens": a.max_tokens,
           "seconds": wall, "requests_per_s": len(ok) / wall, "completion_tokens_per_s": tokens / wall,
           "p50_s": percentile(lat, 0.5) if lat else None, "p95_s": percentile(lat, 0.95) if lat else None,
           "max_s": max(lat) if lat else None, "mean_completion_tokens": tokens / max(len(ok), 1),
           "errors": len(errors), "mixed_outputs": mixed, "sequential_replay_seconds": solo,
           "sequential_requests_per_s": len(ok) / solo if solo else None,
           "first_errors": [str(e)[:200] for e in errors[:3]]}
    print("| models | clients x requests | requests/s | p50 (s) | p95 (s) | max (s) | completion tok/s | errors "
          "| mixed outputs | sequential requests/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {', '.join(models)} | {a.clients} x {a.requests} | {out['requests_per_s']:.2f} | "
          f"{out['p50_s']:.2f} | {out['p95_s']:.2f} | {out['max_s']:.2f} | {out['completion_tokens_per_s']:.0f} | "
          f"{out['errors']} | {mixed} | {out['sequential_requests_per_s']:.2f} |")
    for e in out["first_errors"]:
        print(f"error: {e}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({**out, "latencies_s": lat}, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
