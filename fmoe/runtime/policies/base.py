"""The event protocol every policy follows, policy options, and the registry.

A policy holds no tensors and knows no devices. The live runtime (`fmoe.runtime.offload`) and the
trace simulator (`fmoe.sim`) drive the very same objects, so a simulator figure is a statement
about the shipped code.

Keys are flat ints, ``key = layer * num_experts + expert``, where ``layer`` counts MoE layers only
(0 .. L-1). Event order for one iteration (token step) of one batch:

    on_request_start(seq, prompt, token_ids)      # once per request
    for each MoE layer l:
        on_layer_start(l) -> prefetch orders      # before the router of layer l runs
        SlotTable.acquire(keys of layer l)        # -> on_hit / on_insert / victim / on_evict
        on_routed(l, experts, probs)              # what layer l routed, with the full softmax
    on_token_end()

Under ``execution="hybrid"`` a miss may be computed where the expert lives instead of loaded
(`fmoe.runtime.policies.placement`): the policy is asked ``keep(key, victim)`` (is `key` worth
more in the cache than `victim`?), and a use computed on the host is reported by ``on_host(key)``
in place of the table's insert; the cache is left as it was.
    on_request_end(seq)

Every event comes from one thread (the forward thread, or the simulator's loop): a policy that
searches on a worker thread keeps that thread's state to itself and hands results back as
immutable values (`fmoe.runtime.predictor.Prediction`).

`victim` picks among the resident keys the table offers (pinned keys excluded).

A policy may also offer ``take(keys, slot_of, key_of, free, n_free, pinned, out_slot, out_hit,
victims) -> (done, misses, victims named)``: one layer's pinned uses in one call on the table's
arrays, with exactly the effect of the per-use events in order (a hit, or a miss that takes the
last of the `n_free` free slots, then the slot of the victim the policy names). keys [n] int64;
slot_of [L * E] int64, the table's slot per key (-1: none), and key_of [S] int64, its key per
slot (-1: free), both updated; free [>= n_free] int64 the free slots (read); out_slot [n]
int64, out_hit [n] bool and victims [n] int64 are written. `done` < n says that every resident
key was pinned when key `done` needed a slot. The table (`SlotTable.acquire_many`) then calls it
in place of those events and brings its counts and free list up to date from what it wrote; a
policy without it gets them one by one. A policy with `take` may also offer ``hit_all(keys)``:
the effect of `take` when every key is resident (the table checks, then calls it instead).

Prefetch orders are advisory. The caller (the runtime's copy engine, or the simulator's) serves
demand loads first, then orders by falling priority; the orders returned by the latest
`on_layer_start` replace any earlier orders whose copy has not started. A prefetch takes its
slot (`SlotTable.prefetch`, which may evict) when its copy starts, and the table first asks
`admit_prefetch(key, victim)`, so a policy can refuse a prefetch that would evict something more
valuable.

Capabilities are plain attributes read from *instances* (an instance's options decide them):

* ``prefetches``: `on_layer_start` may return orders;
* ``wants_probs``: `on_routed` reads the router's softmax (the runtime computes it on the host
  only when asked);
* ``uses_maps``: the policy keeps expert maps (the runtime then hands it token embeddings).

Options: each policy class names a frozen dataclass, ``Options``; `make_policy` and the simulator
pass only the fields it has and reject unknown names with the list of accepted ones.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a policy that takes none."""


class Policy:
    """Base policy: demand paging, no prefetch. Subclasses override `victim` and the hooks."""

    name = "base"
    Options: ClassVar[type] = NoOptions
    # capabilities (defaults; a subclass or an instance may set its own)
    prefetches = False
    wants_probs = False
    uses_maps = False

    def __init__(self, num_layers: int, num_experts: int, capacity: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.capacity = capacity

    # -- workload events -------------------------------------------------------------------
    def on_request_start(self, seq_id: int, prompt: str | None = None,
                         token_ids: Sequence[int] | None = None) -> None:
        pass

    def on_layer_start(self, layer: int) -> list[tuple[int, float]]:
        """Layer `layer` is about to run. Returns prefetch orders ``[(key, priority), ...]``,
        highest priority first; the caller may drop any of them."""
        return []

    def on_routed(self, layer: int, experts: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Layer `layer` routed to `experts` (int array [n], unique) with router softmax `probs`
        ([E] for one token or [B, E] for a batch) when known."""
        pass

    def on_token_end(self) -> None:
        pass

    def on_request_end(self, seq_id: int) -> None:
        pass

    # -- cache events (driven by SlotTable) ------------------------------------------------
    def on_hit(self, key: int) -> None:
        pass

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        """`key` became resident; `prefetch` when loaded ahead of need (not yet used)."""
        pass

    def on_evict(self, key: int) -> None:
        pass

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        raise NotImplementedError

    def admit_prefetch(self, key: int, victim: int | None) -> bool:
        """A prefetch of `key` is about to take a slot, evicting `victim` (None: a free slot).
        Return False to refuse it. Default: admit."""
        return True

    # -- hybrid execution --------------------------------------------------------------------
    def keep(self, key: int, victim: int) -> bool:
        """A miss of `key` (not resident) would evict `victim`: True when `key` is worth more in
        the cache (load it), False to compute this use where the expert lives. Default: load."""
        return True

    def on_host(self, key: int) -> None:
        """`key` (not resident) was used and computed on the host; the cache did not change."""
        pass

    # -- life cycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop any worker the policy runs (idempotent)."""


# -- options -----------------------------------------------------------------------------------

def option_names(cls: type) -> set[str]:
    """The option names a policy class accepts."""
    opts = getattr(cls, "Options", NoOptions)
    return {f.name for f in dataclasses.fields(opts)}


def make_options(cls: type, options: dict[str, Any] | None = None, *, base=None):
    """`options` (a dict) -> the class's options dataclass (on top of `base`, an instance of
    it, when given). Unknown names raise ValueError listing the accepted ones."""
    opts_cls = getattr(cls, "Options", NoOptions)
    options = dict(options or {})
    unknown = sorted(set(options) - option_names(cls))
    if unknown:
        accepted = ", ".join(sorted(option_names(cls))) or "none"
        raise ValueError(f"policy {getattr(cls, 'name', cls.__name__)!r} takes no option "
                         f"{', '.join(unknown)} (options: {accepted})")
    check_option_types(cls, options)
    if base is not None:
        return dataclasses.replace(base, **options)
    return opts_cls(**options)


def _type_text(tp) -> str:
    if tp is type(None):
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _accepts(tp, value) -> bool | None:
    """Whether `value` fits the annotation `tp` (None: an annotation this check cannot read,
    so the value is let through)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        seen = [_accepts(a, value) for a in args]
        return True if any(seen) else (None if None in seen else False)
    if tp is bool:
        return isinstance(value, (bool, np.bool_))
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return None


def check_option_types(cls: type, options: dict[str, Any]) -> None:
    """Check each option's value against the type its ``Options`` dataclass field declares
    (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``Any``); a wrong one raises ValueError
    naming the policy, the option and the expected type. The runtime, the simulator and the
    command lines all pass their options through here."""
    opts_cls = getattr(cls, "Options", NoOptions)
    try:
        hints = typing.get_type_hints(opts_cls)
    except Exception:    # an annotation this module cannot resolve: no type check
        return
    for name, value in options.items():
        tp = hints.get(name)
        if tp is None or _accepts(tp, value) is not False:
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) \
            else (tp,)
        expected = " or ".join(_type_text(a) for a in args)
        raise ValueError(f"policy {getattr(cls, 'name', cls.__name__)!r} option {name} must be "
                         f"{expected}, got {value!r} ({type(value).__name__})")


# -- registry ----------------------------------------------------------------------------------

POLICIES: dict[str, type[Policy]] = {}

# names resolved on first use (kept for code that registers a policy defined elsewhere)
LAZY_POLICIES: dict[str, tuple[str, str]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def policy_class(name: str) -> type[Policy] | None:
    """The registered class for `name` (importing a lazily registered one), or None."""
    cls = POLICIES.get(name)
    if cls is None and name in LAZY_POLICIES:
        import importlib

        module, attr = LAZY_POLICIES[name]
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None
        POLICIES[name] = cls
    return cls


def policy_names() -> list[str]:
    """Names `make_policy` accepts (lazily registered ones only when importable)."""
    return sorted(n for n in set(POLICIES) | set(LAZY_POLICIES) if policy_class(n) is not None)


def make_policy(name: str, num_layers: int, num_experts: int, capacity: int, **kwargs) -> Policy:
    """Build a policy by name (``POLICIES`` holds the registered ones). `kwargs` are the
    policy's options (its ``Options`` dataclass fields); an unknown one raises ValueError."""
    cls = policy_class(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()}")
    make_options(cls, kwargs)            # validates names before the constructor runs
    return cls(num_layers, num_experts, capacity, **kwargs)
