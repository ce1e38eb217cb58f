"""`fmoe simulate`: replay routing traces through the runtime's policies under a timing model.

    fmoe simulate --trace T.npz --policy lru --cache-fraction 0.25 [--hardware rtx3090-pcie4]
    fmoe simulate --trace T.npz --sweep [--fractions 0.1,0.25,0.5] [--policies lru,oracle]
                  [--hardware rtx3090-pcie4,h100-pcie5] [--csv out.csv] [--plot out.png]

`register(subparsers)` adds the sub-command to the `fmoe` console script; `python -m fmoe.sim`
runs it alone. Bad input gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from ..errors import FmoeError

DEFAULT_HARDWARE = "rtx3090-pcie4"
DEFAULT_FRACTIONS = "0.1,0.25,0.5"
NO_PROBS = {"lru", "lfu", "belady", "oracle", "moe-infinity"}   # policies that ignore probs
PROG = "fmoe simulate"
PROGRESS_DELAY_S = 3.0      # a replay shows its progress bar once it has run this long


class UsageError(FmoeError):
    pass


def _fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 < f <= 1) or math.isnan(f):
        raise argparse.ArgumentTypeError(f"cache fraction must be in (0, 1], got {text}")
    return f


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_policy_options(items: list[str]) -> dict:
    """KEY=VALUE strings -> {key: JSON value, or the string itself}; shared with `fmoe bench`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--policy-option {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _shape_differs(shape, trace) -> bool:
    """Whether `trace`'s routing does not fit `shape` (its MoE layers or experts differ)."""
    return (shape.num_moe_layers, shape.num_experts) != (trace.num_layers, trace.num_experts)


def _check_options(policy_class, policies: list[str], options: dict) -> None:
    from ..runtime.policies import check_option_types, option_names

    for name in policies:
        accepted = option_names(policy_class(name))
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise UsageError(f"policy {name!r} takes no option {', '.join(unknown)} (options: "
                             f"{', '.join(sorted(accepted)) or 'none'})")
        try:
            check_option_types(policy_class(name), options)
        except ValueError as e:
            raise UsageError(f"--policy-option: {e}") from None


def _check_destination(path: str, flag: str) -> None:
    """A --csv/--plot destination the sweep can write (`fmoe.files.unwritable`), checked before
    the sweep (minutes) rather than after it."""
    from ..files import unwritable

    why = unwritable(path)
    if why:
        raise UsageError(f"{flag} {path}: {why}")


def _check_plot(path: str) -> None:
    """--plot needs matplotlib (the sim extra) and a file type it writes."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'fmoe[sim]'")
    from matplotlib.backend_bases import FigureCanvasBase

    kind = Path(path).suffix[1:].lower()
    types = FigureCanvasBase.get_supported_filetypes()
    if kind and kind not in types:
        raise UsageError(f"--plot {path}: matplotlib cannot write .{kind} files "
                         f"(choose one of {', '.join(sorted(types))})")
    _check_destination(path, "--plot")


def _progress_bar(total: int):
    """A tqdm bar over `total` replayed tokens on stderr, shown once the run passes
    `PROGRESS_DELAY_S`, or None: only on a terminal, or whatever the terminal with
    FMOE_PROGRESS=1 (FMOE_PROGRESS=0 hides it). Never on stdout."""
    import os

    mode = os.environ.get("FMOE_PROGRESS", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return None
    if mode not in ("1", "true", "yes", "on"):
        try:
            if not sys.stderr.isatty():
                return None
        except (AttributeError, ValueError):
            return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="replaying", unit="tok", unit_scale=True, leave=False,
                delay=PROGRESS_DELAY_S, file=sys.stderr, dynamic_ncols=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, metavar="T.npz",
                   help="routing trace (format v1) to replay")
    p.add_argument("--history", metavar="H.npz",
                   help="trace that fills the policy's history (expert-map store) before the "
                        "replay; not measured")
    p.add_argument("--policy", metavar="P",
                   help="lru, lfu, moe-infinity, belady, oracle, ... (required unless --sweep)")
    p.add_argument("--cache-fraction", type=_fraction, metavar="F",
                   help="device cache = floor(F * L * E) routed-expert slots, one pool for all "
                        "MoE layers (required unless --capacity or --sweep)")
    p.add_argument("--capacity", type=positive_int, metavar="N",
                   help="device cache in slots, instead of --cache-fraction")
    p.add_argument("--prefetch-distance", type=positive_int, metavar="D",
                   help="layers ahead a prefetching policy may prefetch (policy default if "
                        "omitted)")
    p.add_argument("--policy-option", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="options of the policy's constructor (several after one flag, or the flag "
                        "repeated), e.g. "
                        "eviction=pfreq, max_orders=1, tokens=2 for 'horizon'; VALUE is read as "
                        "JSON when it parses, else as a string")
    p.add_argument("--hardware", default=None, metavar="NAME",
                   help=f"hardware profile (default {DEFAULT_HARDWARE}); with --sweep a "
                        "comma-separated list")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the last stdout line)")
    p.add_argument("--model", metavar="NAME",
                   help="built-in model shape (deepseek-v2-lite, mixtral-8x7b, qwen1.5-moe-a2.7b, "
                        "qwen3-30b-a3b, deepseek-v3, kimi-k2, qwen3-30b-a3b-fp8); default: from "
                        "the trace's `model`")
    p.add_argument("--model-config", metavar="CONFIG",
                   help="HF config.json (or its directory) giving the model shape")
    p.add_argument("--dtype", metavar="DTYPE",
                   help="expert weight dtype (default: the config's, else bfloat16)")
    p.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="replay only the first N tokens (quick runs)")
    p.add_argument("--engine", default="auto", choices=["auto", "events", "demand", "lru"],
                   help="replay engine (all give the same counts; auto picks the fastest)")
    p.add_argument("--execution", default="load", choices=["load", "host", "hybrid"],
                   help="where misses run: load (copy into the cache), host (computed on the "
                        "host beside a static hot set) or hybrid (decided per miss)")
    p.add_argument("--host-gbps", type=_positive_float, metavar="G",
                   help="host compute rate of routed experts in GB/s of weights (overrides the "
                        "profile's host figure)")
    p.add_argument("--vs-oracle", action="store_true",
                   help="also replay Belady demand paging and report loads against it")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the on-disk cache of derived arrays")
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep", action="store_true",
                   help="sweep cache fractions x policies x hardware profiles")
    g.add_argument("--fractions", default=DEFAULT_FRACTIONS, metavar="LIST",
                   help=f"cache fractions of the sweep (default {DEFAULT_FRACTIONS})")
    g.add_argument("--policies", metavar="LIST",
                   help="policies of the sweep (default: every registered one but horizon)")
    g.add_argument("--csv", metavar="PATH", help="write the sweep rows to this CSV file")
    g.add_argument("--plot", metavar="PATH", help="write hit rate and TPOT plots to this PNG")
    g.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="worker processes for the sweep (default 1)")


def sweep_grid(policies: str | None, fractions: str) -> tuple[list[str], list[float]]:
    """A sweep's --policies (comma-separated; default: every sweep policy) and --fractions, or
    UsageError naming the flag."""
    from .replay import sweep_policy_names

    names = _csv_list(policies) if policies else sweep_policy_names()
    try:
        values = [_fraction(x) for x in _csv_list(fractions)]
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--fractions: {e}") from None
    if not names or not values:
        raise UsageError("--policies and --fractions must not be empty")
    return names, values


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `simulate` sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "simulate", help="replay routing traces through expert-cache policies",
        description="Replay a routing trace (format v1) through the runtime's expert-cache "
                    "policies under a timing model; report hit rate, TPOT, stall and bytes "
                    "moved.")
    add_arguments(p)
    p.error = _fail  # one line, exit code 2
    p.set_defaults(func=run)
    return p


# -- the command --------------------------------------------------------------------------

def _profile_model(hws) -> dict | None:
    """The model a calibrated profile among `hws` was measured with (its ``model`` block), or
    None; profiles of different models cannot share one run."""
    models = [h.model for h in hws if getattr(h, "model", None)]
    keys = ("num_layers", "num_experts", "top_k", "hidden", "inter")
    if any(tuple(m.get(k) for k in keys) != tuple(models[0].get(k) for k in keys) for m in models):
        raise UsageError("the calibrated profiles were measured with different models; run them apart")
    return models[0] if models else None


def _resolve_shape(args, trace, hws=()):
    """The model shape: --model-config, --model, a calibrated profile's model (its config.json
    when still there, else its recorded dimensions on the trace model's shape), the trace's
    model; checked against the trace and the profile."""
    from .shapes import get_shape, guess_shape, load_config_shape, shape_from_config

    if args.model_config and args.model:
        raise UsageError("give --model or --model-config, not both")
    measured = _profile_model(hws)
    from_profile = False
    if args.model_config:
        shape = load_config_shape(args.model_config)
    elif args.model:
        shape = get_shape(args.model)
    elif measured is not None and measured.get("path") and (Path(measured["path"]) / "config.json").is_file():
        shape = load_config_shape(measured["path"])
        from_profile = True
    elif measured is not None and guess_shape(trace.model) is not None and measured.get("num_layers"):
        m = measured
        shape = dataclasses.replace(get_shape(guess_shape(trace.model)), num_moe_layers=int(m["num_layers"]),
                                    num_experts=int(m["num_experts"]), top_k=int(m["top_k"]),
                                    hidden=int(m["hidden"]), moe_intermediate=int(m["inter"]))
        from_profile = True
    elif guess_shape(trace.model) is not None and not (
            trace.model_config and _shape_differs(get_shape(guess_shape(trace.model)), trace)):
        shape = get_shape(guess_shape(trace.model))
    elif trace.model_config:
        # a recorded trace carries its model's config.json (fmoe.runtime.recorder); it wins over
        # a built-in shape of the same name that the trace's routing does not fit (a shrunk
        # `fmoe synth` checkpoint named after the model it imitates)
        try:
            shape = shape_from_config(trace.model_config, name=trace.model or None)
        except (FmoeError, KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{args.trace}: the trace's model_config gives no model shape "
                             f"({e}); pass --model NAME or --model-config config.json") from None
    else:
        from .shapes import MODEL_SHAPES

        raise UsageError(f"cannot tell the model shape of trace model {trace.model!r}; pass "
                         f"--model NAME ({', '.join(MODEL_SHAPES)}) or --model-config config.json")
    shape = shape.with_dtype(args.dtype)
    if measured is not None and measured.get("num_layers") is not None and (
            int(measured["num_layers"]), int(measured.get("num_experts", shape.num_experts))) \
            != (shape.num_moe_layers, shape.num_experts):
        raise UsageError(f"the calibrated profile was measured with {measured['num_layers']} MoE "
                         f"layers x {measured.get('num_experts')} experts, the model shape "
                         f"{shape.name!r} has {shape.num_moe_layers} x {shape.num_experts}")
    explicit = bool(args.model or args.model_config or from_profile)
    if (explicit and shape.num_experts == trace.num_experts
            and shape.num_moe_layers < trace.num_layers):
        return shape        # a shrunk model (fmoe synth --layers): the trace's first layers
    if (shape.num_moe_layers, shape.num_experts) != (trace.num_layers, trace.num_experts):
        raise UsageError(f"trace has {trace.num_layers} MoE layers x {trace.num_experts} experts "
                         f"but model shape {shape.name!r} has {shape.num_moe_layers} x "
                         f"{shape.num_experts}")
    return shape


def timing_models(hws, shape, host_gbps: float | None = None) -> dict:
    """{profile name: TimingModel} of `shape` under each hardware profile in `hws`. A calibrated
    profile carries its own measured timing, which replaces the built-in shape's roofline (it
    has no roofline figures); `host_gbps` overrides the host's compute rate. Shared with
    tools/bench_sim.py, so both give the same figures."""
    from .timing import TimingModel

    timings = {h.name: (h.timing_model() if hasattr(h, "timing_model") else TimingModel.from_shape(shape, h))
               for h in hws}
    if host_gbps:
        timings = {n: dataclasses.replace(tm, host=tm.expert_bytes / (host_gbps * 1e9))
                   for n, tm in timings.items()}
    return timings


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _run(args) -> int:
    from .hardware import HARDWARE, get_hardware
    from .replay import capacity_for, policy_class, simulate
    from .trace import load_trace

    # cheap checks first
    # None: not given; an empty value is an error, not the default profile
    hw_names = _csv_list(args.hardware) if args.hardware is not None else [DEFAULT_HARDWARE]
    if not hw_names:
        raise UsageError(f"--hardware is empty; give a profile ({', '.join(HARDWARE)}) or a "
                         "profile file from `fmoe calibrate`")
    if len(hw_names) > 1 and not args.sweep:
        raise UsageError("several --hardware profiles need --sweep")
    hws = [get_hardware(h) for h in hw_names]
    if args.sweep:
        policies, fractions = sweep_grid(args.policies, args.fractions)
        if args.capacity or args.cache_fraction:
            raise UsageError("--sweep takes --fractions, not --cache-fraction/--capacity")
        if args.csv:
            _check_destination(args.csv, "--csv")
        if args.plot:
            _check_plot(args.plot)
    else:
        if not args.policy:
            raise UsageError("--policy is required (or --sweep)")
        if args.cache_fraction is None and args.capacity is None:
            raise UsageError("--cache-fraction (or --capacity) is required")
        if args.cache_fraction is not None and args.capacity is not None:
            raise UsageError("give --cache-fraction or --capacity, not both")
        if args.csv or args.plot:
            raise UsageError("--csv and --plot belong to --sweep")
        policies = [args.policy]
    for p in policies:
        policy_class(p)
    checked = dict(parse_policy_options(args.policy_option)) if args.policy_option else {}
    if args.prefetch_distance and not args.sweep:
        # one policy: one that does not prefetch would take the distance and change nothing
        from ..runtime.policies import option_names

        if "prefetch_distance" not in option_names(policy_class(args.policy)):
            raise UsageError(f"--prefetch-distance: policy {args.policy!r} does not prefetch")
    if checked:
        _check_options(policy_class, policies, checked)

    # the router softmax can be large; load it only for policies that may read it
    probs = any(p not in NO_PROBS for p in policies)
    trace = load_trace(args.trace, gate_probs=probs)
    if args.max_tokens:
        trace = trace.head(args.max_tokens)
    history = load_trace(args.history, gate_probs=probs) if args.history else None
    shape = _resolve_shape(args, trace, hws)
    if shape.num_moe_layers < trace.num_layers:
        # as the live routing replay does: a model with fewer MoE layers gets the first ones
        print(f"fmoe simulate: the trace's first {shape.num_moe_layers} of {trace.num_layers} MoE "
              f"layers (model shape {shape.name!r})", file=sys.stderr)
        trace = trace.first_layers(shape.num_moe_layers)
        if history is not None:
            history = history.first_layers(shape.num_moe_layers)
    timings = timing_models(hws, shape, args.host_gbps)
    if args.execution != "load" and args.sweep:
        raise UsageError("--execution host/hybrid takes one run, not --sweep")
    options = dict(parse_policy_options(args.policy_option))
    if args.prefetch_distance:
        options["prefetch_distance"] = args.prefetch_distance
    options = options or None
    use_cache = not args.no_cache
    common = {"model": shape.name, "trace": str(args.trace),
              "history": str(args.history) if args.history else None,
              "prefetch_distance": args.prefetch_distance}

    if args.sweep:
        from .sweep import format_table, plot, run_sweep, write_csv

        t0 = time.perf_counter()

        def progress(rs):
            if not args.json:
                for h, d in rs:
                    print(f"  {h:>14} {d['policy']:>13} {100 * d['cache_fraction']:5.1f}%  hit "
                          f"{d['hit_rate']:.3f}  TPOT {d['tpot_ms']:8.2f} ms  "
                          f"({d['wall_s']:.0f} s)", file=sys.stderr, flush=True)

        rows = run_sweep(trace, policies, fractions, timings, jobs=args.jobs, history=history,
                         use_cache=use_cache, policy_options=options, progress=progress)
        for r in rows:
            r.update(common)
        if args.csv:
            write_csv(rows, args.csv)
        if args.plot:
            plot(rows, args.plot, title=f"{trace.model}: {trace.num_tokens} tokens, "
                                        f"{trace.num_sequences} sequences")
        if args.json:
            print(json.dumps(_json_safe({"sweep": rows})))
        else:
            print(format_table(rows))
            print(f"({len(rows)} runs in {time.perf_counter() - t0:.0f} s"
                  + (f"; CSV {args.csv}" if args.csv else "")
                  + (f"; plot {args.plot}" if args.plot else "") + ")")
        return 0

    tm = timings[hws[0].name]
    if args.capacity is not None:
        cap_kw = {"capacity": args.capacity}
    else:
        cap_kw = {"cache_fraction": args.cache_fraction}
        capacity_for(trace, args.cache_fraction)
    passes = 1 + (args.policy == "oracle") + bool(args.vs_oracle)
    bar = _progress_bar(passes * trace.num_tokens)
    tick = bar.update if bar is not None else None
    try:
        res = simulate(trace, args.policy, tm, history=history, engine=args.engine,
                       use_cache=use_cache, policy_options=options, progress=tick,
                       execution=args.execution, **cap_kw)
        if args.vs_oracle:
            b = simulate(trace, "belady", tm, capacity=res.capacity, use_cache=use_cache,
                         progress=tick)
    finally:
        if bar is not None:
            bar.close()
    d = res.to_dict()
    d.update(common)
    d["hardware"] = hws[0].name
    d["host_ms"] = tm.host * 1e3
    if args.vs_oracle:
        d["belady_hit_rate"] = b.hit_rate
        d["belady_loads_per_token"] = b.loads_per_token
        d["loads_vs_belady"] = (res.loads_per_token / b.loads_per_token
                                if b.loads_per_token else None)
    if args.json:
        print(json.dumps(_json_safe(d)))
    else:
        from .sweep import single_table

        print(single_table(d))
    return 0


def run(args) -> int:
    """Entry point of the sub-command: returns the exit code."""
    try:
        return _run(args)
    except (FmoeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{PROG}: error: out of memory loading or replaying the trace", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
