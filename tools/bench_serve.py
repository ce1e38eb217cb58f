"""Serving benchmark: replay a request-arrival and length trace against `fmoe serve`, with and
without continuous batching, and print a markdown table of throughput and TTFT / TPOT
percentiles.

    python tools/bench_serve.py                       # demo checkpoint, Azure conv trace, ShareGPT prompts
    python tools/bench_serve.py --requests 40 --rate 2 --quick

The trace is a CSV with ``TIMESTAMP,ContextTokens,GeneratedTokens`` (the Azure LLM inference
traces). Scaled to the machine: arrival times are compressed so that the replayed requests arrive
at `--rate` requests/s on average (the trace's own burstiness is kept), prompt lengths are capped
at `--max-context` tokens and output lengths at `--max-output`. Prompts are ShareGPT first turns
(``{"conversations": [{"from": "human", "value": ...}]}``), tokenized with the model's tokenizer
and cut (or repeated) to the trace's context length, then sent as token ids so that the server
sees exactly that many prompt tokens. Every request is greedy with ``ignore_eos`` so that it
generates exactly the trace's output length.

Each configuration (``--max-batch`` values; 1 disables continuous batching) runs in a fresh
server process on a free loopback port. TTFT is measured by the client from sending the request
to the first streamed text; TPOT is (last token time - first token time) / (tokens - 1) per
request; throughput is generated tokens over the time from the first arrival to the last
completion.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import runpy
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT.parent / "shared" / "data"

# The data is not shipped with fmoe: where to get it.
TRACE_HOW = ("The arrival trace is AzureLLMInferenceTrace_conv_2023.csv (columns TIMESTAMP, "
             "ContextTokens, GeneratedTokens) from the Azure public dataset "
             "(https://github.com/Azure/AzurePublicDataset, AzureLLMInferenceDataset2023); "
             "download it and pass --trace PATH.")
PROMPTS_HOW = ("The prompts are a ShareGPT-format JSON list ([{\"conversations\": [{\"from\": "
               "\"human\", \"value\": ...}]}]), e.g. ShareGPT_V3_unfiltered_cleaned_split.json "
               "from the hub dataset anon8231489123/ShareGPT_Vicuna_unfiltered; pass --prompts PATH.")


def read_trace(path: Path, skip: int, n: int) -> list[tuple[float, int, int]]:
    """-> [(seconds since the first replayed row, context tokens, generated tokens)]."""
    rows = []
    with open(path, newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            if i < skip:
                continue
            if len(rows) == n:
                break
            ts = r["TIMESTAMP"].strip()
            # "2023-11-16 18:15:46.6805900": 7 fractional digits, more than fromisoformat takes
            head, _, frac = ts.partition(".")
            t = datetime.fromisoformat(head).timestamp() + (float("0." + frac) if frac else 0.0)
            rows.append((t, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    if not rows:
        raise SystemExit(f"{path}: no rows after skipping {skip}")
    t0 = rows[0][0]
    return [(t - t0, c, g) for t, c, g in rows]


def read_prompts(path: Path) -> list[str]:
    data = json.loads(Path(path).read_text())
    out = []
    for item in data:
        for turn in item.get("conversations", []):
            if turn.get("from") == "human" and turn.get("value", "").strip():
                out.append(turn["value"])
                break
    if not out:
        raise SystemExit(f"{path}: no human turns found")
    return out


def build_requests(trace, prompts, tok, rate: float, max_context: int, max_output: int):
    span = trace[-1][0] or 1.0
    scale = (len(trace) - 1) / rate / span if len(trace) > 1 else 0.0   # trace seconds -> replay seconds
    reqs = []
    for i, (t, ctx, gen) in enumerate(trace):
        ctx = max(1, min(ctx, max_context))
        gen = max(1, min(gen, max_output))
        ids = tok.encode(prompts[i % len(prompts)])
        while len(ids) < ctx:
            ids = ids + tok.encode(prompts[(i + len(ids)) % len(prompts)], add_special_tokens=False)
        reqs.append({"at": t * scale, "prompt": ids[:ctx], "max_tokens": gen})
    return reqs


async def one(client, url: str, model: str, req: dict, t_start: float) -> dict:
    await asyncio.sleep(max(0.0, t_start + req["at"] - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "sent": sent}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            now = time.perf_counter()
            if obj.get("choices") and obj["choices"][0].get("text"):
                first = first or now
                last = now
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    done = time.perf_counter()
    first = first or done
    last = last or done
    return {"ok": True, "sent": sent, "ttft": first - sent, "tokens": tokens, "done": done,
            "tpot": (last - first) / (tokens - 1) if tokens > 1 else None,
            "want": req["max_tokens"]}


async def replay(url: str, model: str, reqs: list[dict]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        # warm-up: one short request
        await one(client, url, model, {"at": 0, "prompt": reqs[0]["prompt"][:8], "max_tokens": 2},
                  time.perf_counter())
        t_start = time.perf_counter()
        return await asyncio.gather(*[one(client, url, model, r, t_start) for r in reqs])


def pct(xs, p):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(label: str, res: list[dict]) -> dict:
    ok = [r for r in res if r["ok"]]
    start = min(r["sent"] for r in res)
    end = max(r["done"] for r in ok) if ok else start
    toks = sum(r["tokens"] for r in ok)
    wrong = sum(1 for r in ok if r["tokens"] != r["want"])
    dur = end - start
    return {"mode": label, "requests": len(res), "failed": len(res) - len(ok), "wrong_length": wrong,
            "duration_s": dur, "tokens": toks, "tok_per_s": toks / dur if dur else float("nan"),
            "req_per_s": len(ok) / dur if dur else float("nan"),
            "ttft_p50_ms": 1e3 * pct([r["ttft"] for r in ok], 50),
            "ttft_p99_ms": 1e3 * pct([r["ttft"] for r in ok], 99),
            "tpot_p50_ms": 1e3 * pct([r["tpot"] for r in ok], 50),
            "tpot_p99_ms": 1e3 * pct([r["tpot"] for r in ok], 99)}


def table(rows: list[dict]) -> str:
    head = ("| mode | requests | output tokens | duration (s) | throughput (tok/s) | requests/s | "
            "TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['requests'] - r['failed']}/{r['requests']} | {r['tokens']} | "
                     f"{r['duration_s']:.1f} | {r['tok_per_s']:.1f} | {r['req_per_s']:.2f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | "
                     f"{r['tpot_p99_ms']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the demo checkpoint)")
    ap.add_argument("--trace", type=Path, default=DATA / "serving" / "AzureLLMInferenceTrace_conv_2023.csv")
    ap.add_argument("--prompts", type=Path, default=DATA / "prompts" / "sharegpt_v3_filtered_first_turn_1000.json")
    ap.add_argument("--requests", type=int, default=100, help="trace rows to replay (default: 100)")
    ap.add_argument("--skip", type=int, default=0, help="trace rows to skip first")
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrival rate after compression, requests/s")
    ap.add_argument("--max-context", type=int, default=512, help="cap on prompt tokens (default: 512)")
    ap.add_argument("--max-output", type=int, default=64, help="cap on generated tokens (default: 64)")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[32, 1],
                    help="server --max-batch values to compare (default: 32 1; 1 = no continuous batching)")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (default: 1)")
    ap.add_argument("--server-args", default="", help="extra `fmoe serve` flags, e.g. '--expert-cache 0.25'")
    ap.add_argument("--quick", action="store_true", help="20 requests at 2/s, outputs capped at 16")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.rate, args.max_output = 20, 2.0, 16
    for flag, path, how in (("--trace", args.trace, TRACE_HOW), ("--prompts", args.prompts, PROMPTS_HOW)):
        if not path.is_file():
            print(f"bench_serve: error: {flag} {path}: no such file. {how}", file=sys.stderr)
            return 2

    from fmoe.runtime.tokenizer import Tokenizer
    from fmoe.serve.demo import demo_checkpoint

    # the tests' harness: `fmoe serve` in a child process on a free port, healthy before use
    ServerProcess = runpy.run_path(str(ROOT / "tests" / "serve" / "server_process.py"))["ServerProcess"]

    model = Path(args.model) if args.model else demo_checkpoint()
    tok = Tokenizer.from_dir(model)
    trace = read_trace(args.trace, args.skip, args.requests)
    prompts = read_prompts(args.prompts)
    reqs = build_requests(trace, prompts, tok, args.rate, args.max_context, args.max_output)
    name = "bench"
    last = args.skip + len(reqs) - 1
    prompt_mean = statistics.mean(len(r["prompt"]) for r in reqs)
    print(f"model {model}; {len(reqs)} requests from {args.trace.name} (rows {args.skip}..{last}), "
          f"arrivals compressed to {args.rate:g} req/s over {reqs[-1]['at']:.1f} s; prompts {prompt_mean:.0f} "
          f"tokens mean (cap {args.max_context}), outputs {statistics.mean(r['max_tokens'] for r in reqs):.0f} "
          f"mean (cap {args.max_output})", file=sys.stderr)
    rows = []
    env = {"OMP_NUM_THREADS": str(args.threads)}
    for mb in args.max_batch:
        extra = ["--served-model-name", name, "--max-batch", str(mb), "--threads", str(args.threads),
                 "--log-level", "warning", "--max-queue", str(max(256, len(reqs))), *args.server_args.split()]
        with ServerProcess(model, *extra, env=env) as srv:
            res = asyncio.run(replay(srv.url, name, reqs))
        label = "no batching (--max-batch 1)" if mb == 1 else f"continuous batching (--max-batch {mb})"
        rows.append(summarize(label, res))
        print(f"{label}: done", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    bad = sum(r["failed"] + r["wrong_length"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
