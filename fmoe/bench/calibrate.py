"""`fmoe calibrate`: this machine's profile with this model, for `fmoe simulate --hardware FILE`.

Measured, not modelled:

- **reads**: cold reads of randomly chosen experts through the store's own read path (the same
  `ExpertStore` and `FileReader` settings, O_DIRECT included, that an offloaded run uses), the
  files' cached pages dropped first, by as many threads at once as the CPU copy engine runs:
  the wall time over the count is the profile's copy time per expert. Then reads one at a
  time: a read alone takes as long as `lanes` reads side by side take per expert. A disk that
  serves each read at a fixed latency (reads side by side overlap) gives ``lanes`` = the
  thread count; a disk capped in bandwidth (reads side by side split its rate: a throttled
  virtual disk) gives 1. The simulator lands a layer's misses `lanes` at a time, each taking
  ``lanes`` x copy.
- **misses** (CPU): decode steps on a probe whose cache holds K experts per MoE layer, fed
  random tokens, so nearly every routed expert is a demand read through the runtime's copy
  engine, each step followed by a twin routed to the same (now cached) experts: per miss, the
  forward's wait and the compute a miss adds over the twin. Their sum (per
  read lane) is the profile's copy time on CPU: it is what the runs' misses cost, which the
  cold reads alone under-count (`measure_misses`; ``miss_steps=0`` keeps the cold reads').
- **compute**: decode steps with the same K experts resident in every MoE layer (so nothing
  loads), timed per part with forward pre-hooks: before the first MoE layer (embedding, dense
  layers), each MoE layer, after the last (final norm, lm_head). The same steps with the routed
  experts skipped give the per-layer resident part; the difference, per routed expert, is the
  expert compute.
- **host-to-device bandwidth** on CUDA (a pinned copy of one expert).

On CPU an offloaded layer waits for its missed experts before it computes its shared experts,
so the profile folds the shared experts into the layer's resident part (``shared`` = 0).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..models.experts import Experts


class _FixedExperts(Experts):
    """Routes every token of the layer to the same K experts (slots 0..K-1 of `inner`), or
    skips the routed experts altogether (`skip`)."""

    def __init__(self, inner: Experts, ids: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.moe_layer = inner.moe_layer
        self.ids = ids
        self.skip = False

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        if self.skip:
            return torch.zeros_like(x)
        ids = self.ids.expand(x.shape[0], -1)
        return self.inner(x, topk_weights, ids, None)


def _wrap_experts(blocks, make) -> list[Experts]:
    """Put `make(experts)` in place of each MoE block's experts; returns the wrappers (undo with
    `_unwrap_experts`)."""
    wrappers = []
    for b in blocks:
        w = make(b.experts)
        b.experts = w
        wrappers.append(w)
    return wrappers


def _unwrap_experts(blocks, wrappers) -> None:
    for b, w in zip(blocks, wrappers):
        b.experts = w.inner


def _boundary_hooks(module, blocks, mark) -> list:
    """Forward pre-hooks calling `mark()` at the start of each MoE layer and of the final norm
    (so consecutive marks bound one MoE layer); returns the handles."""
    layers = list(module.model.layers)
    hooks = [layer.register_forward_pre_hook(lambda m, a: mark()) for layer in layers
             if any(layer.ffn is b for b in blocks)]
    hooks.append(module.model.norm.register_forward_pre_hook(lambda m, a: mark()))
    return hooks


def _time_steps(model, steps: int, marks: list) -> list[list[float]]:
    """Run `steps` decode steps; returns per-step lists of time stamps taken at `marks`."""
    cache = model.new_cache()
    out = []
    tok = torch.tensor([[1]], device=model.device)
    with torch.inference_mode():
        model.module(torch.tensor([[1, 2, 3, 4]], device=model.device), cache=cache, last_only=True)
        for _ in range(steps):
            marks.clear()
            t0 = time.perf_counter()
            model.module(tok, cache=cache, last_only=True)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            out.append([t0] + list(marks) + [time.perf_counter()])
    return out


def measure_compute(model, steps: int = 6) -> dict:
    """Per-part decode compute of a loaded `MoEModel` (experts resident or cached): medians
    over `steps` decode steps after the first (a warm-up), so `steps` >= 2."""
    if steps < 2:
        raise ValueError(f"compute is timed over steps after a warm-up one: steps must be >= 2, got {steps}")
    module = model.module
    shp = model.config.experts
    K = shp.top_k
    blocks = module.moe_blocks()
    ids = torch.arange(K, device=model.device).view(1, K)
    wrappers = _wrap_experts(blocks, lambda inner: _FixedExperts(inner, ids))
    marks: list[float] = []
    hooks = _boundary_hooks(module, blocks, lambda: marks.append(time.perf_counter()))
    n = len(hooks) - 1                      # MoE layers
    try:
        full = _time_steps(model, steps, marks)
        for w in wrappers:
            w.skip = True
        bare = _time_steps(model, steps, marks)
    finally:
        for h in hooks:
            h.remove()
        _unwrap_experts(blocks, wrappers)

    def parts(rows):
        # rows: [t0, start of MoE layer 0..L-1, start of norm, end]
        pre = statistics.median(r[1] - r[0] for r in rows[1:])
        layer = [statistics.median(r[i + 2] - r[i + 1] for r in rows[1:]) for i in range(n)]
        post = statistics.median(r[-1] - r[-2] for r in rows[1:])
        total = statistics.median(r[-1] - r[0] for r in rows[1:])
        return pre, layer, post, total

    pre, layer_full, post, total_full = parts(full)
    _, layer_bare, _, total_bare = parts(bare)
    expert = max(0.0, (sum(layer_full) - sum(layer_bare)) / (n * K))
    return {"token_pre": pre, "attn": layer_bare, "expert": expert, "token_post": post,
            "token_seconds": total_full, "token_seconds_no_routed": total_bare}


class _Repeat(Experts):
    """Records the experts the layer routes to, or (`again`) routes to the recorded ones."""

    def __init__(self, inner: Experts):
        super().__init__()
        self.inner = inner
        self.moe_layer = inner.moe_layer
        self.ids: torch.Tensor | None = None
        self.again = False

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        if self.again:
            topk_ids = self.ids.expand(x.shape[0], -1)
        else:
            self.ids = topk_ids[-1:].clone()
        return self.inner(x, topk_weights, topk_ids, router_probs)


def measure_misses(model, steps: int = 8, lanes: int = 1, seed: int = 0) -> dict:
    """Decode steps that miss, on an offloaded `MoEModel` whose cache holds K experts per MoE
    layer (the probe, LRU): random tokens, so nearly every routed expert is a demand read
    through the runtime's own copy engine, reader threads and slots. Each is followed by a step
    routed to the same experts, which are then all cached: the same compute with no miss, a
    moment later (this VM's speed drifts by tens of percent within minutes). Per miss:

    - ``stall_per_miss``: the forward's wait, as the runs' ``stall_seconds`` count it;
    - ``cpu_per_miss``: what a miss adds to the rest of the step (wall less stall and policy)
      over its all-hit twin: measured on a 2-core box, 0.1-0.9 ms per miss in the runs, which
      the cold reads alone do not show;
    - ``copy``: the simulator's copy time per expert (with `lanes` reads in flight) that gives
      this decode's stall plus that CPU time: the stall the simulator lands for a layer's k
      misses is ceil(k / lanes) x lanes x copy (`fmoe.sim.engines.demand_stall`).

    ``repeat_misses`` counts the misses of the all-hit steps (0 unless the cache is smaller
    than K per layer)."""
    rt = model.runtime
    module = model.module
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    blocks = module.moe_blocks()
    wrappers = _wrap_experts(blocks, _Repeat)
    marks: list[int] = []
    hooks = _boundary_hooks(module, blocks, lambda: marks.append(rt.misses))
    lanes = max(1, int(lanes))

    def step(tok, cache, again: bool) -> tuple[float, float, int]:
        """(wall less stall and policy, stall, misses) of one decode step."""
        for w in wrappers:
            w.again = again
        marks.clear()
        m0, s0, p0 = rt.misses, rt.stall, rt.policy_time
        t0 = time.perf_counter()
        module(tok, cache=cache, last_only=True)
        wall = time.perf_counter() - t0
        stall = rt.stall - s0
        return wall - stall - (rt.policy_time - p0), stall, rt.misses - m0

    walls, stalls, extra, misses, rounds, repeat = [], [], [], [], 0, 0
    per_layer = [0] * (len(hooks) - 1)
    try:
        cache = model.new_cache()
        with torch.inference_mode():
            module(torch.randint(vocab, (1, 4), generator=gen).to(model.device), cache=cache, last_only=True)
            for i in range(steps + 2):            # two steps first: the cache holds routed experts
                tok = torch.randint(vocab, (1, 1), generator=gen).to(model.device)
                rest, stall, m = step(tok, cache, False)
                got = list(marks)
                rest_hit, _, m_hit = step(tok, cache, True)
                if i < 2:
                    continue
                repeat += m_hit
                walls.append(rest + stall)
                stalls.append(stall)
                misses.append(m)
                extra.append(rest - rest_hit)
                for j, (a, b) in enumerate(zip(got, got[1:])):
                    per_layer[j] += b - a
                    rounds += (b - a + lanes - 1) // lanes
    finally:
        for h in hooks:
            h.remove()
        _unwrap_experts(blocks, wrappers)
    n = sum(misses)
    if n == 0:
        raise RuntimeError("calibrate: the decode with a small cache missed nothing")
    cpu = max(0.0, statistics.median(extra)) * steps / n
    stall = sum(stalls)
    return {"steps": steps, "misses": n, "misses_per_step": n / steps,
            "step_seconds": statistics.median(walls), "stall_per_miss": stall / n,
            "cpu_per_miss": cpu, "lanes": lanes, "rounds": rounds, "layer_misses": per_layer,
            "repeat_misses": repeat, "copy": (stall + cpu * n) / (rounds * lanes)}


def cold_store(model_path: Path, dtype=None, memory_limit: int | None = None):
    """(store, reader, files, keys): the model's `ExpertStore` with the runtime's read settings
    (O_DIRECT as decided in this process, or under `memory_limit` bytes), its files with their
    cached pages dropped, and its count of routed experts. Close `reader` when done."""
    from ..bench.cgroup import drop_file_pages
    from ..io.checkpoint import FileReader
    from ..models.loading import expert_layouts
    from ..runtime.offload import OffloadRuntime
    from ..runtime.store import ExpertStore

    cfg, _, _, _, layouts, _, dtype = expert_layouts(Path(model_path), dtype)
    shp = cfg.experts
    reader = FileReader()
    OffloadRuntime._direct_reads(layouts, reader, room=memory_limit)
    store = ExpertStore(layouts, shp.hidden, shp.inter, dtype, 0, pin=False, reader=reader)
    files = sorted({s.info.file for row in layouts for lay in row for s in lay.w13 + lay.w2})
    drop_file_pages(files)
    return store, reader, files, shp.num_layers * shp.num_experts


def slot_buffers(store, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (w13, w2) read targets made like the CPU cache's slots (anonymous memory, huge pages
    where allowed). Where a read lands matters: an O_DIRECT read into 4 KiB pages reaches the
    disk as more requests than one into huge pages, and a throttled virtual disk counts requests
    (measured on one: 22-25 ms per expert into 4 KiB pages, 15-16 into huge pages, against
    13.5-16.9 ms per miss in the runs)."""
    from ..runtime.offload import _zeros

    cpu, H, I = torch.device("cpu"), store.hidden, store.inter
    w13 = _zeros((n, 2 * I, H), cpu, store.dtype)
    w2 = _zeros((n, H, I), cpu, store.dtype)
    return [(w13[i], w2[i]) for i in range(n)]


def measure_reads(model_path: Path, samples: int = 48, seed: int = 0, dtype=None,
                  memory_limit: int | None = None, device: str = "cpu") -> dict:
    """Cold reads of random experts through the store's read path: seconds per read. O_DIRECT
    or not as the runtime decides it in this process, or, with `memory_limit` (bytes), in a
    process limited to that much (a run inside a memory cgroup). On CPU the reads land in
    buffers made like the cache's slots (huge pages where allowed), as the runtime's do; on
    CUDA in the copy engine's staging buffers."""
    from ..runtime.transfer import CopyEngine

    store, reader, files, n_all = cold_store(model_path, dtype, memory_limit)
    rng = random.Random(seed)
    # at least one expert is left unread for the reads alone (a second read of one is warm)
    samples = max(1, min(samples, n_all - 1))
    picked = rng.sample(range(n_all), min(samples + max(1, samples // 2), n_all))
    keys, alone = picked[:samples], picked[samples:] or picked[:1]
    # as many readers as the CPU copy engine runs: a layer's misses are read side by side, so
    # the time per expert that matters is the wall time over the count, not one read's latency
    readers = CopyEngine.cpu_readers
    if torch.device(device).type == "cpu":
        bufs = slot_buffers(store, readers)
    else:
        bufs = [store.new_staging() for _ in range(readers)]
    times = []

    def one(i):
        b13, b2 = bufs[i % readers]
        for key in keys[i::readers]:
            t0 = time.perf_counter()
            store.read_into(key, b13, b2)
            times.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(one, range(readers)))
    wall = time.perf_counter() - t0
    # then one at a time (other experts, still cold): what a read costs when it is alone
    single = []
    for key in alone:
        t1 = time.perf_counter()
        store.read_into(key, *bufs[0])
        single.append(time.perf_counter() - t1)
    direct = any(reader.is_direct(f) for f in files)
    reader.close()
    per = wall / len(keys)
    alone_s = statistics.median(single)
    return {"read_seconds": per, "read_latency_median": statistics.median(times),
            "read_latency_p90": sorted(times)[int(0.9 * (len(times) - 1))], "readers": readers,
            "read_alone_seconds": alone_s, "lanes": read_lanes(alone_s, per, readers),
            "expert_bytes": store.expert_bytes, "read_GBps": store.expert_bytes / per / 1e9,
            "samples": len(times), "o_direct": direct}


def read_lanes(alone: float, per: float, readers: int) -> int:
    """Reads in flight that the simulator should model: a read alone taking `alone` seconds,
    `readers` side by side `per` seconds per expert. Side by side reads that overlap fully
    (alone = readers x per) are `readers` lanes; reads that split one rate (alone = per) one."""
    if per <= 0:
        return 1
    return max(1, min(int(readers), round(alone / per)))


def check_model_dir(path: Path) -> dict:
    """The checkpoint's config.json (validated as its family reads it), before anything is
    measured; ValueError (ConfigError) naming the directory or the file otherwise."""
    from ..models.config import read_config_json

    if not path.exists():
        raise ValueError(f"{path}: no such directory (fmoe calibrate measures a local checkpoint "
                         "directory)")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (fmoe calibrate measures a local checkpoint "
                         "directory)")
    raw = read_config_json(path)
    _probe_cache(path)          # its family and fields, as the probe will load them
    return raw


def calibrate(model_path, dtype=None, samples: int = 48, steps: int = 6, device: str = "cpu",
              out=print, memory_limit: int | None = None, miss_steps: int = 8) -> dict:
    """The profile dict (see the module docstring); `out` gets progress lines. `memory_limit`
    (bytes): the limit the runs will have, so that the reads go the way they will there
    (O_DIRECT once the experts exceed half of it)."""
    from ..models import from_pretrained
    from ..runtime.lm import parse_dtype
    from ..sim.shapes import shape_from_config
    from .cgroup import cpu_times, steal_fraction

    dtype = parse_dtype(dtype)
    path = Path(model_path)
    raw = check_model_dir(path)     # a missing or bad config.json before the first progress line
    ticks = cpu_times()
    shape = shape_from_config(raw)
    n_all = shape.num_moe_layers * shape.num_experts
    if samples >= n_all:
        out(f"calibrate: the model has {n_all} routed experts: {max(1, n_all - 1)} read side by side "
            f"(not {samples}), the next alone")
        samples = max(1, n_all - 1)
    out(f"calibrate: cold reads of {samples} experts ...")
    reads = measure_reads(path, samples, dtype=dtype, memory_limit=memory_limit, device=device)
    out(f"calibrate: {reads['expert_bytes'] / 2**20:.1f} MiB per expert, {reads['read_seconds'] * 1e3:.1f} ms "
        f"each with {reads['readers']} readers ({reads['read_GBps']:.2f} GB/s; one read's latency "
        f"{reads['read_latency_median'] * 1e3:.1f} ms median; alone {reads['read_alone_seconds'] * 1e3:.1f} ms, "
        f"so {reads['lanes']} lane(s); O_DIRECT {reads['o_direct']})")
    out("calibrate: decode compute ...")
    probe = from_pretrained(path, device=device, dtype=dtype, expert_cache=_probe_cache(path), policy="lru")
    cpu = torch.device(device).type == "cpu"
    misses = None
    try:
        if memory_limit is not None and probe.runtime is not None:
            rt = probe.runtime
            rt._direct_reads(rt.store.layouts, rt.store.reader, room=memory_limit)
        comp = measure_compute(probe, steps)
        shp = probe.config.experts
        model_dtype = probe.dtype
        out(f"calibrate: {comp['token_seconds'] * 1e3:.0f} ms per token with {shp.top_k} experts per layer "
            f"resident; {comp['expert'] * 1e3:.2f} ms per routed expert")
        if cpu and miss_steps > 0 and probe.runtime is not None:
            out(f"calibrate: {miss_steps} decode steps that miss ...")
            misses = measure_misses(probe, miss_steps, reads["lanes"])
            out(f"calibrate: {misses['misses_per_step']:.0f} misses per step, "
                f"{misses['stall_per_miss'] * 1e3:.1f} ms stall and {misses['cpu_per_miss'] * 1e3:.2f} ms "
                f"of compute each: copy {misses['copy'] * 1e3:.1f} ms per expert "
                f"(cold reads alone: {reads['read_seconds'] * 1e3:.1f})")
    finally:
        probe.close()
    # a calibration taken while other guests held the CPUs describes them, not this machine
    steal = steal_fraction(ticks, cpu_times())
    if steal is not None and steal > 0.05:
        out(f"calibrate: the hypervisor gave {steal:.0%} of the CPU time to other guests during "
            f"this calibration: its timings are slower than this machine's")
    # on CPU the copy time is the runtime's own per miss (its readers, its slots, what a miss
    # costs the forward thread); the cold reads alone ran 10-25% faster than the runs' misses
    copy = misses["copy"] if misses is not None else reads["read_seconds"]
    shape = shape_from_config(raw, name=raw.get("_name_or_path") or path.name)
    h2d = h2d_bandwidth(reads["expert_bytes"]) if torch.device(device).type == "cuda" else None
    profile = {
        "format": "fmoe-hardware-profile", "version": 1,
        "name": f"calibrated:{platform.node() or 'host'}:{path.name}",
        "description": f"measured by fmoe calibrate on {platform.node()} ({os.cpu_count()} CPUs, "
                       f"torch threads {torch.get_num_threads()}), device {device}, {model_dtype}",
        "device": device,
        "model": {"path": str(path), "model_type": raw.get("model_type"), "num_layers": shp.num_layers,
                  "num_experts": shp.num_experts, "top_k": shp.top_k, "hidden": shp.hidden,
                  "inter": shp.inter, "dtype": str(model_dtype).replace("torch.", "")},
        "link_bw": reads["expert_bytes"] / copy,
        "timing": {"attn": comp["attn"], "shared": 0.0, "expert": comp["expert"],
                   "copy": copy, "attn_ctx": 0.0, "token_pre": comp["token_pre"],
                   "token_pre_ctx": 0.0, "token_post": comp["token_post"],
                   "expert_bytes": reads["expert_bytes"],
                   # on CPU the reads in flight that overlap (`read_lanes`); on CUDA one copy
                   # stream
                   "lanes": reads["lanes"] if cpu else 1},
        "measured": {"reads": reads, "misses": misses, "steal_fraction": steal,
                     "token_seconds": comp["token_seconds"],
                     "token_seconds_no_routed": comp["token_seconds_no_routed"],
                     "h2d_bytes_per_s": h2d},
        "shape": shape.name if shape is not None else None,
    }
    return profile


def h2d_bandwidth(nbytes: int, repeats: int = 20) -> float:  # pragma: no cover (CUDA only)
    """Pinned host -> device copy rate of one expert, bytes/s (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[2:])


def _probe_cache(path: Path) -> int:
    """Slots for K experts in every MoE layer (nothing loads after the first step)."""
    from ..models.config import read_config_json
    from ..models.registry import family_for

    raw = read_config_json(path)
    config_cls, _ = family_for(raw.get("model_type")).load()
    shp = config_cls.from_hf(raw).experts
    return shp.num_layers * shp.top_k
