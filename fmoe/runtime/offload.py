"""The offload runtime: a bounded device cache of routed experts, fed by the copy engine and
managed by a policy object.

The device cache is one preallocated buffer per expert weight, w13 [S, 2I, H] and w2 [S, H, I];
a `SlotTable` maps (layer, expert) keys to slots. Each MoE layer's experts module remaps the
router's expert ids to slot ids and calls the same `fused_moe` as a resident run, which is what
makes offloading lossless. When a step needs more distinct experts in one layer than there are
slots (a long prefill on a tiny cache), the layer runs in chunks of at most S experts.

With ``execution="host"`` or ``"hybrid"`` a miss may instead be computed where the expert lives
(`fmoe.runtime.host`), as the placement rule decides (`fmoe.runtime.policies.placement`): the
layer's device pairs run through `fused_moe` over the slots with the host pairs pointed at the
zero slot, the host computes its pairs beside it, and the two sets of weighted terms are added
before the sum over k.
"""

from __future__ import annotations

import logging
import numbers
import re
import sys
import time
from typing import Any

import numpy as np
import torch

from ..files import FileLock
from ..kernels import fused_moe, select_backend
from ..models.experts import Experts
from .policies import MissCost, check_execution, make_policy, place
from .slots import SlotTable, fraction_slots
from .store import ExpertStore
from .transfer import DEMAND, PREFETCH, CopyEngine, parse_bandwidth

_BYTE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

log = logging.getLogger(__name__)


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]?i?b)\s*", text.lower())
    if not m:
        raise ValueError(f"cannot parse byte size {text!r} (expected e.g. '8GiB', '512MiB')")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


CACHE_FORMS = ("a fraction in (0, 1], a count of experts >= 1, a size such as '8GiB', 'auto' or "
               "'mmap'")


def cache_form(expert_cache) -> tuple[str, Any]:
    """The form of an `expert_cache` value, checked without the model: ("auto", None),
    ("mmap", None), ("fraction", f), ("count", n) or ("bytes", n); ValueError naming the
    accepted forms. "0.25" and "96" read as a fraction and a count."""
    if isinstance(expert_cache, bool):
        raise ValueError(f"expert_cache must be {CACHE_FORMS}, not a bool")
    if isinstance(expert_cache, numbers.Integral):        # numpy's integers and floats too
        expert_cache = int(expert_cache)
    elif isinstance(expert_cache, numbers.Real):
        expert_cache = float(expert_cache)
    if isinstance(expert_cache, str):
        text = expert_cache.strip()
        if text.lower() in ("auto", "mmap"):
            return text.lower(), None
        if re.fullmatch(r"[0-9]+", text):
            expert_cache = int(text)
        elif re.fullmatch(r"[0-9]*\.[0-9]*", text) and text != ".":
            expert_cache = float(text)
        else:
            try:
                return "bytes", parse_bytes(text)
            except ValueError:
                raise ValueError(f"expert_cache: cannot parse {expert_cache!r}; give "
                                 f"{CACHE_FORMS}") from None
    if isinstance(expert_cache, float):
        if not 0 < expert_cache <= 1:
            raise ValueError(f"expert_cache fraction must be in (0, 1], got {expert_cache}")
        return "fraction", expert_cache
    if isinstance(expert_cache, int):
        if expert_cache < 1:
            raise ValueError(f"expert_cache count must be >= 1, got {expert_cache}")
        return "count", expert_cache
    raise ValueError(f"expert_cache must be {CACHE_FORMS}, got {expert_cache!r}")


def min_capacity(top_k: int) -> int:
    """The smallest cache the runtime accepts: one expert. A layer that needs more experts than
    the cache holds runs them in chunks of what it holds (slow, but exact)."""
    return 1


def parse_capacity(expert_cache, num_layers: int, num_experts: int, top_k: int,
                   expert_bytes: int, device: torch.device | str = "cpu") -> int:
    """`expert_cache` -> number of slots: a float in (0, 1] is a fraction of all routed experts,
    an int >= 1 a count, a string such as "8GiB" a byte budget ("0.25" and "96" also work);
    "auto" what `device`'s free memory holds (GPU memory on CUDA, else the process's)."""
    total = num_layers * num_experts
    kind, value = cache_form(expert_cache)
    if kind == "auto":
        from .memory import auto_capacity, device_memory

        slots, line = auto_capacity(expert_bytes, total, limit=device_memory(device))
        print(line, file=sys.stderr, flush=True)
        if slots < min_capacity(top_k):
            raise ValueError(f"expert_cache='auto': no expert fits ({line}): free memory or raise "
                             f"the limit")
        return slots
    if kind == "bytes":
        slots = value // expert_bytes
        what = f"{expert_cache.strip()} ({slots} experts of {expert_bytes} bytes)"
    elif kind == "fraction":
        slots = max(1, fraction_slots(value, total))      # a fraction of less than one: one
        what = f"fraction {value} ({slots} of {total} experts)"
    elif kind == "count":
        slots = value
        what = f"{slots} experts"
    else:
        raise ValueError(f"expert_cache={expert_cache!r} is not a managed cache")
    if slots < min_capacity(top_k):
        raise ValueError(f"expert_cache {what} holds no expert (the minimum is one)")
    return min(slots, total)


def _profile_data(profile) -> tuple[dict, str]:
    """A calibrated profile (a path or its dict) as (its dict, how messages name it), checked to
    have its `timing` part; ValueError naming the profile when it is not one (as fmoe.sim's
    loader does: the runtime does not import it)."""
    import json
    from pathlib import Path

    if isinstance(profile, dict):
        data, where = profile, "hardware_profile"
    else:
        where = f"hardware_profile {str(profile)!r}"
        try:
            data = json.loads(Path(profile).read_text())
        except OSError as e:
            raise ValueError(f"{where}: cannot read the hardware profile ({e.strerror})") from None
        except ValueError as e:
            raise ValueError(f"{where}: not a JSON hardware profile ({e})") from None
    t = data.get("timing") if isinstance(data, dict) else None
    need = ("attn", "expert", "copy")
    if not isinstance(t, dict) or any(k not in t for k in need):
        raise ValueError(f"{where}: not a profile from `fmoe calibrate` (no timing with {', '.join(need)})")
    return data, where


def _profile_timing(profile) -> dict:
    """The `timing` part of a calibrated profile (a path or its dict)."""
    return _profile_data(profile)[0]["timing"]


def check_profile_model(profile, shape) -> None:
    """Refuse (ValueError) a calibrated profile measured with another model shape than `shape`
    (an `ExpertShape`): its times per expert and per layer are that model's. A profile without
    its ``model`` block is taken as it is."""
    data, where = _profile_data(profile)
    m = data.get("model")
    if not isinstance(m, dict):
        return
    mine = {"num_layers": shape.num_layers, "num_experts": shape.num_experts, "hidden": shape.hidden,
            "inter": shape.inter}
    theirs = {k: m.get(k) for k in mine}
    if any(v is not None and v != mine[k] for k, v in theirs.items()):
        raise ValueError(f"{where}: measured with another model ({m.get('num_layers')} MoE layers x "
                         f"{m.get('num_experts')} experts of {m.get('hidden')} x {m.get('inter')}); "
                         f"this one has {shape.num_layers} x {shape.num_experts} of {shape.hidden} x "
                         f"{shape.inter}: calibrate with this model")


def profile_seconds(profile, top_k: int) -> tuple[float, float, int]:
    """(the link's seconds per expert, one MoE layer's compute in seconds, copies in flight at
    once) from a calibrated profile (a path or its dict): what prefetch is decided by."""
    t = _profile_timing(profile)
    attn = t["attn"]
    attn = sum(attn) / len(attn) if isinstance(attn, list) else float(attn)
    layer = attn + float(t.get("shared", 0.0)) + top_k * float(t["expert"])
    return float(t["copy"]), layer, int(t.get("lanes", 1))


def miss_seconds(profile) -> tuple[float, float]:
    """(one expert's copy, one expert computed on the host) in seconds from a calibrated
    profile (a path or its dict). On a CPU profile the host is the device: its expert figure."""
    t = _profile_timing(profile)
    return float(t["copy"]), float(t.get("host", t["expert"]))


def _zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor for the cache slots. On CPU: anonymous memory, zero-filled by the kernel on
    first touch and backed by huge pages where allowed, so that loading does not spend seconds
    zeroing gigabytes the reads will overwrite, and every slot starts page-aligned (O_DIRECT
    reads can land in it directly)."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    import math
    import mmap

    nbytes = max(1, math.prod(shape) * dtype.itemsize)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):   # no THP here: 4 KiB pages work the same
        pass
    # the tensor keeps `buf` alive through the buffer protocol
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


class OffloadedExperts(Experts):
    """The experts module of one MoE layer when experts are offloaded."""

    def __init__(self, runtime: "OffloadRuntime", moe_layer: int):
        super().__init__()
        self.moe_layer = moe_layer
        self._runtime = [runtime]   # a list keeps the runtime out of the module tree

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        return self._runtime[0].run_layer(self.moe_layer, x, topk_weights, topk_ids, router_probs)


def check_map_store(path, shape: tuple[int, int] | None = None, *, flag: str = "map_store",
                    parent_must_exist: bool = False) -> None:
    """Refuse (ValueError) a map-store path holding anything but an fmoe expert-map store (of a
    model with `shape` = (MoE layers, experts) when given): fmoe never overwrites a file it did
    not write. A missing file is fine (its directory is made at save, unless
    `parent_must_exist`). `flag` names the setting in the message (``--map-store`` on the
    command line). The server, the CLIs and `from_pretrained(map_store=...)` share this check."""
    from pathlib import Path

    from ..files import unwritable
    from .predictor import STORE_FORMAT

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p}: is a directory; give a file path (e.g. {p / 'maps.npz'})")
    if not p.exists():
        if parent_must_exist and not p.parent.is_dir():
            raise ValueError(f"{flag} {p}: the directory {p.parent} does not exist")
        why = unwritable(p)          # its lock file is made beside it at start
        if why:
            raise ValueError(f"{flag} {p}: {why}")
        return
    refuse = (f"{flag} {p}: the file exists but is not {{}}; fmoe would overwrite it at exit, "
              "so it refuses: move the file away or choose another path")
    try:
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files") or "format" not in z.files or "shape" not in z.files:
                raise ValueError("no format marker")
            fmt = int(z["format"])
            got = tuple(int(x) for x in np.asarray(z["shape"]).reshape(-1)[:2])
    except Exception:
        raise ValueError(refuse.format("an fmoe expert-map store")) from None
    if fmt != STORE_FORMAT:
        raise ValueError(refuse.format(f"an expert-map store this fmoe reads (format {fmt}, "
                                       f"expected {STORE_FORMAT})"))
    if shape is not None and got != tuple(shape):
        raise ValueError(refuse.format(f"a store of this model (it holds maps of {got[0]} MoE layers x "
                                       f"{got[1]} experts; this model has {shape[0]} x {shape[1]})"))


class OffloadRuntime:
    def __init__(self, module, cfg, layouts, reader, *, device: torch.device, dtype: torch.dtype,
                 expert_cache, policy: str = "fmoe", link_bandwidth=None, host_cache=None,
                 trace_path=None, policy_options: dict | None = None, prefetch_distance=None,
                 map_store=None, hardware_profile=None, execution: str = "load",
                 host_workers: int = 1):
        self.execution = check_execution(execution)
        shp = cfg.experts
        self.shape = shp
        self.L, self.E, self.K = shp.num_layers, shp.num_experts, shp.top_k
        self.device = device
        expert_bytes = 3 * shp.hidden * shp.inter * dtype.itemsize
        self.capacity = parse_capacity(expert_cache, self.L, self.E, self.K, expert_bytes, device)
        opts = dict(policy_options or {})
        if hardware_profile is not None:
            if policy != "fmoe" and self.execution == "load":
                raise ValueError(f"hardware_profile is read by policy='fmoe' (prefetch) and by "
                                 f"execution='host' or 'hybrid'; with policy {policy!r} and "
                                 f"execution 'load' it would change nothing")
            check_profile_model(hardware_profile, shp)
        if policy == "fmoe":
            opts.setdefault("top_k", self.K)
            opts.setdefault("embed_dim", shp.hidden)     # live: the model's token embedding
            # searches off the forward thread only where it runs ahead of the device (CUDA);
            # on CPU the forward thread is the compute, and a worker's predictions (slowed by
            # the GIL) arrived after the layers they were for: no order was ever issued
            opts.setdefault("worker", device.type == "cuda")
            if prefetch_distance is not None:
                opts["prefetch_distance"] = int(prefetch_distance)
            if hardware_profile is not None:
                # a calibrated profile (fmoe calibrate): copy vs. per-layer compute decides
                # whether and how far ahead the policy prefetches
                copy_s, layer_s, lanes = profile_seconds(hardware_profile, self.K)
                opts.setdefault("copy_seconds", copy_s)
                opts.setdefault("layer_seconds", layer_s)
                opts.setdefault("lanes", lanes)
        elif prefetch_distance is not None or map_store is not None:
            given = [n for n, v in (("prefetch_distance", prefetch_distance), ("map_store", map_store))
                     if v is not None]
            raise ValueError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} "
                             f"policy='fmoe' (--policy fmoe), not {policy!r}")
        if map_store is not None:
            check_map_store(map_store, (self.L, self.E))    # before anything is built
        self._policy_args = (policy, opts)
        self.map_store = map_store
        self._store_lock = None
        if map_store is not None:
            # one process per store: another's save at exit would overwrite this one's
            self._store_lock = FileLock(map_store, "map_store")
        self.policy = self._new_policy()
        self._embed = getattr(getattr(module, "model", None), "embed_tokens", None)
        self.table = SlotTable(self.capacity, self.policy)
        S = self.capacity
        # one spare slot past the table's S, all zeros and never assigned: in a chunked layer the
        # pairs of other chunks point there and add exact zeros (see run_layer)
        self.w13 = _zeros((S + 1, 2 * shp.inter, shp.hidden), device, dtype)
        self.w2 = _zeros((S + 1, shp.hidden, shp.inter), device, dtype)
        cuda = device.type == "cuda"
        if host_cache is None:
            host_bytes = 0
        elif isinstance(host_cache, str):
            host_bytes = parse_bytes(host_cache)
        else:
            host_bytes = int(host_cache)
        self.store = ExpertStore(layouts, shp.hidden, shp.inter, dtype, host_bytes, pin=cuda, reader=reader)
        self._direct_reads(layouts, reader)
        self.link_bandwidth = parse_bandwidth(link_bandwidth)
        self.engine = CopyEngine(self.store, self.w13[:S], self.w2[:S], self.link_bandwidth)
        self.host = None
        # per-expert seconds of a load and of a host computation, for the hybrid rule's queues:
        # from a calibrated profile only, so that decisions are a function of the events (a
        # rate measured on the fly would make them, and the rounding, vary run to run)
        self._copy_est = self._host_est = None
        if self.execution != "load":
            from .host import HostExecutor, HostWeights

            self.host = HostExecutor(HostWeights(self.store, dtype), workers=host_workers)
            if hardware_profile is not None:
                self._copy_est, self._host_est = miss_seconds(hardware_profile)
        # the policy's predictor runner, if any (a worker thread when it prefetches); every
        # policy event below comes from this (the forward) thread
        self.scheduler = getattr(self.policy, "runner", None)
        self._in_step = False       # between begin_step and on_token_end (`recover`)
        self._started = -1          # the MoE layer whose on_layer_start this token has had
        self.recorder = None
        if trace_path is not None:
            from .recorder import TraceRecorder

            self.recorder = TraceRecorder(trace_path, self.L, self.E, self.K, model=str(getattr(cfg, "model_type", "")))
        self._lut = torch.empty(self.E, dtype=torch.long, device=device)
        self.reset_stats()
        for layer, block in enumerate(module.moe_blocks()):
            block.experts = OffloadedExperts(self, layer)

    def _new_policy(self):
        policy, opts = self._policy_args
        pol = make_policy(policy, self.L, self.E, self.capacity, **opts)
        if self.map_store is not None:
            # a store that persists should fill even when no decision reads its maps
            pol.keep_maps = True
            pol.load_state(self.map_store)   # checked: missing, or a store of this model
        return pol

    def recover(self) -> None:
        """After a step that did not finish (an exception or an interrupt anywhere in it): a
        slot may be placed but not yet reloaded, keys pinned for a layer that never ran, the
        policy halfway through an event. The copies in flight finish, and the cache starts
        over, empty, with a fresh policy (a map store is read again), so that the next step
        computes what the resident model computes; the stats and the copy engine's health
        carry on. Outside a step (bad input, a caller's callback between steps) the runtime is
        consistent and nothing is dropped."""
        if not self._in_step:
            return
        self._in_step = False
        try:
            self.engine.drain()
        finally:
            old, stats = self.policy, self.table.stats
            self.policy = self._new_policy()
            self.table = SlotTable(self.capacity, self.policy)
            self.table.stats = stats
            self.scheduler = getattr(self.policy, "runner", None)
            self._started = -1
            try:
                old.close()
            except Exception:          # a worker's stored error: that policy is gone anyway
                log.debug("closing the replaced policy failed", exc_info=True)

    @staticmethod
    def _direct_reads(layouts, reader, room: int | None = None) -> None:
        """Experts of a model larger than half the memory this process may use (`room` bytes
        when given) are read with O_DIRECT: the cache holds them, and a page-cache copy would
        only be evicted again (and, under a memory cgroup, be reclaimed at the forward's
        expense)."""
        from ..io.checkpoint import ALIGN
        from .memory import memory_limit

        segs = [s for row in layouts for lay in row for s in lay.w13 + lay.w2]
        files = {s.info.file for s in segs}
        total = sum(lay.nbytes for row in layouts for lay in row)
        if room is None:
            lim = memory_limit()
            room = lim.limit if lim.limit is not None else lim.available
        for f in files:
            reader.use_direct(f, large=total > room // 2)
        direct = any(reader.is_direct(f) for f in files)     # where the filesystem allows it
        starts = (min(s.info.offset + s.byte_offset for s in lay.w13 + lay.w2)
                  for row in layouts for lay in row)
        if direct and any(start % ALIGN for start in starts):
            # measured on a 2-core box: a miss stalled 21-25 ms this way, 16-19 from the store
            print("fmoe: experts are read with O_DIRECT through a bounce buffer and a CPU copy "
                  "(this checkpoint's tensors are not 4096-aligned); `fmoe convert SRC DST` "
                  "writes fmoe's expert store, whose reads land straight in the cache",
                  file=sys.stderr, flush=True)

    # -- stats -----------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.engine.drain()
        self.hits = self.misses = self.host_computed = 0
        self.stall = 0.0
        self.policy_time = 0.0
        self._bytes0 = self.engine.bytes_loaded
        t = self.table.stats
        t.prefetched = t.prefetch_used = 0
        t.resident_peak = len(self.table)

    def uncommitted_bytes(self) -> int:
        """Slot memory the process holds but the kernel has not committed yet (CPU: anonymous
        memory counts once touched; until the slots are read into it is missing from RSS, and a
        memory budget made from "what is free" must not spend it again). 0 on CUDA."""
        if self.device.type != "cpu":
            return 0
        total = self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()
        return max(0, total - self.engine.bytes_loaded)

    def stats(self) -> dict:
        t = self.table.stats
        return {"capacity": self.capacity, "resident_peak": t.resident_peak, "hits": self.hits,
                "misses": self.misses, "prefetched": t.prefetched, "prefetch_used": t.prefetch_used,
                "bytes_loaded": int(self.engine.bytes_loaded - self._bytes0),
                "stall_seconds": self.stall, "policy_seconds": self.policy_time,
                "host_computed": self.host_computed}

    # -- events from the engine ------------------------------------------------------------
    def begin_step(self, input_ids: torch.Tensor, valid: torch.Tensor | None,
                   seq_ids: list[int] | None = None, prompt: bool | None = None) -> None:
        """A forward over input_ids [B, T] starts; row b belongs to request seq_ids[b].
        `prompt`: its tokens are prompt tokens (a chunk of a chunked prefill; default: a
        request's first step is its prompt, later ones generate)."""
        self._in_step = True
        if self.recorder is not None:
            self.recorder.begin_step(input_ids, valid, seq_ids, prompt)
        if self._embed is not None and getattr(self.policy, "uses_maps", False):
            # the semantic key of this iteration: the model's embedding of its token(s)
            with torch.no_grad():
                ids = input_ids[:, -1]
                emb = self._embed(ids).float().mean(dim=0).cpu().numpy()
            self.policy.set_token_embedding(emb)

    def on_token_end(self) -> None:
        self._in_step = False
        self._started = -1
        t0 = time.perf_counter()
        self.policy.on_token_end()
        self.policy_time += time.perf_counter() - t0
        if self.recorder is not None:
            self.recorder.end_step()

    def on_request_start(self, seq_id: int = 0, prompt: str | None = None, token_ids=None) -> None:
        self._started = -1
        self.policy.on_request_start(seq_id, prompt, token_ids)

    def on_request_end(self, seq_id: int = 0) -> None:
        self.policy.on_request_end(seq_id)
        if self.recorder is not None:
            self.recorder.end_request(seq_id)

    # -- the layer ---------------------------------------------------------------------------
    def _start_layer(self, layer: int) -> None:
        """`on_layer_start(layer)` and its prefetch orders. The runtime sees a MoE layer only
        when its router has run, so it starts layer l + 1 as soon as layer l is done: before
        l + 1's attention, as the event protocol (and the simulator) has it, so an order for
        l + 1 has that attention's time to land. The first MoE layer of a token starts when it
        runs."""
        t0 = time.perf_counter()
        orders = self.policy.on_layer_start(layer)
        self.policy_time += time.perf_counter() - t0
        self._started = layer
        if self.execution != "host":    # host: a static hot set, filled on first use only
            self._prefetch(orders)

    def _prefetch(self, orders) -> None:
        if not orders or self.engine.queued_prefetches():
            return   # the link is still busy with earlier orders: newer ones would only queue
        for key, priority in orders:
            got = self.table.prefetch(key)
            if got is None:
                continue
            self.engine.assign(got.slot)
            self.engine.load(key, got.slot, PREFETCH, priority)

    def _issue(self, key: int, slot: int, hit: bool, waits: list[int]) -> None:
        """Count a use of `key` in `slot`; start its load unless it is resident and ready."""
        if hit and self.engine.is_ready(slot):
            self.hits += 1
            return
        self.misses += 1
        if hit:          # a prefetch still queued or in flight
            self.engine.demand(key, slot)
        else:
            self.engine.assign(slot)
            self.engine.load(key, slot, DEMAND)
        waits.append(slot)

    def _wait(self, keys: list[int], waits: list[int]) -> float:
        """Wait for the loads of `waits`; returns the seconds waited. A failed read fails this
        step after unpinning `keys`, so the slots serve later steps (the failed expert stays
        assigned, not ready: its next need reads it again)."""
        waited = 0.0
        try:
            for slot in waits:
                waited += self.engine.wait(slot)
        except BaseException as e:
            self.table.unpin(keys)
            if isinstance(e, Exception):
                # the step's other loads end (read or failed) before its error leaves, so none
                # runs on into a later step: a read that fails there is one that step started
                self.engine.drain()
            raise
        self.stall += waited
        return waited

    def _acquire_into(self, keys: list[int], slots: list[int], waits: list[int]) -> None:
        """Take slots for `keys` (pinned; the table decides them in one call, through the
        policy's `take` where it has one), then start the loads of those not ready."""
        hits: list[bool] = []
        n, t0 = len(slots), time.perf_counter()
        self.table.acquire_many(keys, slots=slots, hits=hits)
        self.policy_time += time.perf_counter() - t0
        for key, slot, hit in zip(keys, slots[n:], hits):
            self._issue(key, slot, hit, waits)

    def _acquire(self, keys: list[int]) -> list[int]:
        """Make `keys` resident and ready (pinned); returns their slots."""
        slots, waits = [], []
        self._acquire_into(keys, slots, waits)
        self._wait(keys, waits)
        return slots

    def run_layer(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, router_probs: torch.Tensor | None) -> torch.Tensor:
        """x [N, H], topk_weights [N, K], topk_ids [N, K] expert ids -> [N, H]."""
        if self._started != layer:
            self._start_layer(layer)
        # first-appearance order (for one token: the router's order), as a trace replays it
        experts = list(dict.fromkeys(topk_ids.reshape(-1).tolist()))
        run = self._run_loaded if self.host is None else self._run_split
        out = run(layer, x, topk_weights, topk_ids, experts)
        self._routed(layer, topk_ids, experts, router_probs)
        return out

    def _run_loaded(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """The layer with every used expert loaded into the cache (in chunks when they do not
        fit at once)."""
        base = layer * self.E
        if len(experts) <= self.capacity:
            chunks = [experts]
        else:
            # resident experts first, so a chunk does not evict what a later chunk needs
            experts.sort(key=lambda e: (base + e) not in self.table)
            chunks = [experts[i:i + self.capacity] for i in range(0, len(experts), self.capacity)]
        lut = self._lut
        chunked = len(chunks) > 1
        # on the CPU a chunk computes only its own (token, k) pairs, written into one [N, K, H]
        # buffer; the Triton path keeps its tiles as the resident layer's (every pair, the
        # others on the zero slot, which add exact zeros)
        select = chunked and x.device.type != "cuda"
        terms = x.new_zeros(topk_ids.shape + (x.shape[1],)) if select else None
        # the backend the whole layer would take (it depends on the token count), for every chunk
        backend = select_backend(x, self.w13, self.w2) if select else None
        for chunk in chunks:
            keys = [base + e for e in chunk]
            slots = self._acquire(keys)
            lut.fill_(self.capacity)               # the zero slot
            lut[torch.as_tensor(chunk, device=lut.device)] = torch.as_tensor(slots, device=lut.device)
            slot_ids = lut[topk_ids]
            if not chunked:
                out = fused_moe(x, self.w13, self.w2, topk_weights, slot_ids)
            elif select:
                # each pair is computed in exactly one chunk, by the same kernel over the same
                # rows of its expert as in the resident layer, so the summed terms equal the
                # resident layer's bit for bit
                t, k = torch.nonzero(slot_ids != self.capacity, as_tuple=True)
                part = fused_moe(x[t], self.w13, self.w2, topk_weights[t, k][:, None],
                                 slot_ids[t, k][:, None], backend=backend, reduce=False)
                terms[t, k] = part[:, 0]
            else:
                part = fused_moe(x, self.w13, self.w2, topk_weights, slot_ids, reduce=False)
                terms = part if terms is None else terms + part
            self.engine.mark_used(slots)
            self.table.unpin(keys)
        if chunked:
            out = terms.sum(dim=1)
        return out

    def _routed(self, layer: int, topk_ids: torch.Tensor, experts: list[int],
                router_probs: torch.Tensor | None) -> None:
        probs = None
        if self.policy.prefetches or self.policy.wants_probs or self.recorder is not None:
            probs = router_probs.float().cpu().numpy() if router_probs is not None else None
        t0 = time.perf_counter()
        self.policy.on_routed(layer, np.asarray(experts, dtype=np.int64), probs)
        self.policy_time += time.perf_counter() - t0
        if self.recorder is not None:
            self.recorder.record(layer, topk_ids, probs)
        if layer + 1 < self.L:
            self._start_layer(layer + 1)

    def _cost(self, loads: int, hosted: int) -> MissCost | None:
        """The hybrid rule's estimate for one more miss after `loads` loads and `hosted` host
        computations decided in this layer (None until both rates are known)."""
        if self._copy_est is None or self._host_est is None:
            return None
        # demand loads of earlier layers have all been waited for, and prefetches queue behind
        # demand: the link's queue ahead of this miss is this layer's own loads
        return MissCost((loads + 1) * self._copy_est, (hosted + 1) * self._host_est)

    def _run_split(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """A layer under host/hybrid execution: x [N, H] -> [N, H]."""
        base, table = layer * self.E, self.table
        # the resident experts first (pinned), so no decision below evicts one of them
        dev = [e for e in experts if base + e in table]
        slots, waits, host, loads = [], [], [], 0
        self._acquire_into([base + e for e in dev], slots, waits)
        t0 = time.perf_counter()
        for e in experts:
            key = base + e
            if key in table:
                continue
            if len(dev) < self.capacity and place(self.execution, table, key,
                                                  self._cost(loads, len(host))):
                self._acquire_into([key], slots, waits)
                dev.append(e)
                loads += 1
            else:
                table.host(key)
                host.append(e)
        self.policy_time += time.perf_counter() - t0
        keys = [base + e for e in dev]
        job = None
        if host:
            # the host's share starts first and runs beside the device's
            cpu = torch.device("cpu")
            job = self.host.submit(layer, self.E, x.to(cpu), topk_weights.to(cpu),
                                   topk_ids.to(cpu), host)
            self.host_computed += len(host)
        self._wait(keys, waits)
        out = None
        if dev:
            lut = self._lut
            lut.fill_(self.capacity)               # the zero slot
            lut[torch.as_tensor(dev, device=lut.device)] = torch.as_tensor(slots, device=lut.device)
            slot_ids = lut[topk_ids]
            out = fused_moe(x, self.w13, self.w2, topk_weights, slot_ids, reduce=job is None)
            self.engine.mark_used(slots)
        table.unpin(keys)
        if job is not None:
            terms, _ = job.result()
            terms = terms.to(x.device)
            # device terms are exact zeros on host pairs and the reverse: the sum over k then
            # adds what an all-device layer adds, in the same order
            out = (terms if out is None else out + terms).sum(dim=1)
        return out

    def close(self) -> None:
        try:
            if self.map_store is not None:
                self.policy.save_state(self.map_store)
        finally:
            if self._store_lock is not None:
                self._store_lock.release()
            self.policy.close()
            if self.host is not None:
                self.host.close()
        self.engine.close()
        self.store.reader.close()           # the checkpoint's file handles, now, not at collection
        if self.recorder is not None:
            self.recorder.close()
