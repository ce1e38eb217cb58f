"""Soak test of `fmoe serve`: mixed good and bad traffic from concurrent clients for a while, then
the checks a server that "never falls over" must pass.

    python tools/soak_serve.py                         # demo checkpoint, 240 s, 12 clients
    python tools/soak_serve.py --seconds 600 --server-args "--expert-cache 0.25 --policy lru"

One server process on a free loopback port (default flags: ``--expert-cache 0.25`` with the fmoe
policy, ``--max-batch 8 --max-queue 16``). Each client loops over a random mix of requests:
chat and text completions, streamed and not, greedy and sampled; streams the client drops
after a few chunks; and bad input (malformed JSON, wrong types, negative or huge limits, an
unknown model, an empty message list, token ids outside the vocabulary). Afterwards:

- the server is alive and ``/health`` answers ok;
- no response was a 5xx other than 503 (a full queue says 503 by design);
- a greedy completion gives the same text as at the start;
- the resident set, sampled every ``--sample`` seconds, did not grow by more than
  ``--max-growth`` between the end of the first third of the run and its end (warm-up excluded);
- SIGTERM stops it with exit code 0 within 30 s.

Prints the status codes by kind of request, the RSS samples and the checks; exits 1 when a
check fails. ``--json FILE`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BAD = ("bad_json", "bad_types", "huge", "unknown_model", "empty_messages", "negative",
       "ids_out_of_vocab")         # refused with a 4xx
KINDS = ("chat", "chat_stream", "completion", "completion_stream", "dropped_stream") + BAD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


async def request(client: httpx.AsyncClient, kind: str, model: str, rnd: random.Random) -> str:
    """One request of `kind`; returns its outcome ('200', '400', ..., 'dropped')."""
    if kind in ("chat_stream", "completion_stream", "dropped_stream"):
        path = "/v1/chat/completions" if kind == "chat_stream" else "/v1/completions"
        body = {"model": model, "stream": True, "max_tokens": rnd.randint(1, 24)}
        if kind == "chat_stream":
            body["messages"] = [{"role": "user", "content": "tell me a story"}]
        else:
            body["prompt"] = "once upon a time"
        if kind == "dropped_stream":
            body["max_tokens"] = 200
        async with client.stream("POST", path, json=body) as r:
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if kind == "dropped_stream" and n > 3:
                    return "dropped"            # leaving the block closes the connection
            return str(r.status_code)
    if kind == "bad_json":
        r = await client.post("/v1/chat/completions", content=b"{not json",
                              headers={"content-type": "application/json"})
        return str(r.status_code)
    bodies = {
        "chat": ("/v1/chat/completions", {"model": model, "max_tokens": rnd.randint(1, 24),
                                          "messages": [{"role": "user",
                                                        "content": "hi " * rnd.randint(1, 40)}]}),
        "completion": ("/v1/completions", {"model": model, "prompt": rnd.choice(["a", "b c d"]),
                                           "max_tokens": rnd.randint(1, 24), "top_p": 0.9,
                                           "temperature": rnd.choice([0, 0.7, 1.3])}),
        "bad_types": ("/v1/completions", {"model": model, "prompt": 12.5, "max_tokens": "x"}),
        "huge": ("/v1/completions", {"model": model, "prompt": "x " * 5000, "max_tokens": 100000}),
        "unknown_model": ("/v1/completions", {"model": "no-such-model", "prompt": "a", "max_tokens": 2}),
        "empty_messages": ("/v1/chat/completions", {"model": model, "messages": []}),
        "negative": ("/v1/completions", {"model": model, "prompt": "a", "max_tokens": -3,
                                         "temperature": -1}),
        "ids_out_of_vocab": ("/v1/completions", {"model": model, "max_tokens": 4,
                                                 "prompt": [rnd.randint(0, 10**6) for _ in range(8)]
                                                 + [10**7]}),
    }
    path, body = bodies[kind]
    r = await client.post(path, json=body)
    return str(r.status_code)


async def traffic(base: str, model: str, seconds: float, clients: int, sample: float,
                  pid: int) -> tuple[dict, list]:
    counts: dict = {}
    stop = time.monotonic() + seconds

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        rnd = random.Random(i)
        while True:                     # at least one request per client, whatever the clock
            kind = rnd.choice(KINDS)
            try:
                outcome = await request(client, kind, model, rnd)
            except httpx.HTTPError as e:
                outcome = f"error:{type(e).__name__}"
            key = f"{kind} {outcome}"
            counts[key] = counts.get(key, 0) + 1
            if time.monotonic() >= stop:
                return

    samples = []
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        tasks = [asyncio.create_task(client_loop(i, client)) for i in range(clients)]
        while time.monotonic() < stop:
            samples.append(rss_mib(pid))
            await asyncio.sleep(sample)
        await asyncio.gather(*tasks)
    samples.append(rss_mib(pid))
    return counts, samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the demo checkpoint)")
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--sample", type=float, default=10, help="seconds between RSS samples")
    ap.add_argument("--max-growth", type=float, default=0.10,
                    help="allowed RSS growth after the first third of the run (fraction)")
    ap.add_argument("--server-args", default="--expert-cache 0.25 --max-batch 8 --max-queue 16",
                    help="flags for `fmoe serve`")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.model is None:
        from fmoe.serve.demo import demo_checkpoint

        args.model = str(demo_checkpoint())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fmoe.serve.cli", "serve", args.model, "--port", str(port),
           "--log-level", "warning", *args.server_args.split()]
    # the server's log to a file: a pipe nobody reads would block it once full
    with tempfile.TemporaryFile("w+") as log:
        srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            return _soak(srv, base, args, log)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()


def _soak(srv: subprocess.Popen, base: str, args, log) -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if srv.poll() is not None:
            log.seek(0)
            print(f"soak: the server exited at start ({srv.returncode}):\n{log.read()[-2000:]}")
            return 1
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        print("soak: the server did not become healthy within 300 s")
        return 1
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    probe = {"model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    before = httpx.post(base + "/v1/completions", json=probe, timeout=300).json()["choices"][0]["text"]
    counts, samples = asyncio.run(traffic(base, model, args.seconds, args.clients, args.sample, srv.pid))
    alive = srv.poll() is None
    checks: dict = {"alive": alive}
    engine = {}
    if alive:
        checks["health ok"] = httpx.get(base + "/health", timeout=30).json().get("status") == "ok"
        after = httpx.post(base + "/v1/completions", json=probe, timeout=300).json()["choices"][0]["text"]
        checks["greedy text unchanged"] = after == before
        # what the engine did meanwhile (preemptions: rows put back to keep the KV budget)
        for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("fmoe_engine_decode_steps_total", "fmoe_engine_prefills_total",
                        "fmoe_engine_preemptions_total"):
                engine[name.removeprefix("fmoe_engine_").removesuffix("_total")] = int(float(value))
    checks["no 5xx but 503"] = not [k for k in counts
                                    if k.split()[-1].isdigit() and int(k.split()[-1]) >= 500
                                    and k.split()[-1] != "503"]
    rss = [s for s in samples if s is not None]
    third = rss[len(rss) // 3] if rss else None
    growth = (max(rss[len(rss) // 3:]) / third - 1) if third else None
    checks["rss growth within limit"] = growth is not None and growth <= args.max_growth
    if alive:
        srv.send_signal(signal.SIGTERM)
        try:
            checks["SIGTERM exit 0"] = srv.wait(30) == 0
        except subprocess.TimeoutExpired:
            checks["SIGTERM exit 0"] = False
    requests = sum(counts.values())
    print(f"## soak: {requests} requests from {args.clients} clients in {args.seconds:.0f} s "
          f"(`fmoe serve {args.server_args}`)")
    print("| request | outcome | count |")
    print("|---|---|---|")
    for key in sorted(counts):
        kind, outcome = key.split(" ", 1)
        print(f"| {kind} | {outcome} | {counts[key]} |")
    print(f"RSS MiB every {args.sample:.0f} s: {rss}"
          + (f" (growth after the first third {growth:+.1%})" if growth is not None else ""))
    if engine:
        print("engine: " + ", ".join(f"{k} {v}" for k, v in engine.items()))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "rss_mib": rss, "checks": checks,
                                         "requests": requests, "engine": engine}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
