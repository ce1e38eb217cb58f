"""Random checkpoints in the hub layout, for the demo, benchmarks and GPU checks.

Any registered family: the tensor names come from the family's own module and expert key map,
so a synthetic checkpoint exercises exactly the loader a real one does. Written shard by shard
(each shard to a temporary name, then renamed), so memory stays bounded by one shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import plain_mode
from .registry import family_for


def _init(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = 1.0 / fan_in ** 0.5
    if name.endswith("gate.weight") and len(shape) == 2:
        std *= 4.0   # a peaked router, as trained models have, so routing varies by token
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def write_random_checkpoint(path: str | os.PathLike, config: dict, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, shard_bytes: int = 2 * 2**30, progress=None) -> Path:
    """Write config.json and random ``*.safetensors`` (per-expert keys) for `config`
    (an HF config dict with ``model_type``). Returns the directory. `progress(nbytes)` is
    called after each shard with the bytes it holds."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_cls, model_cls = family_for(config.get("model_type")).load()
    cfg = config_cls.from_hf(config)
    with torch.device("meta"):
        module = model_cls(cfg)
    shapes: dict[str, tuple[int, ...]] = {n: tuple(p.shape) for n, p in module.named_parameters()}
    if getattr(cfg, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    shp = cfg.experts
    for layer in range(shp.num_layers):
        for e in range(shp.num_experts):
            g, u, d = cfg.expert_keys(layer, e)
            shapes[g] = shapes[u] = (shp.inter, shp.hidden)
            shapes[d] = (shp.hidden, shp.inter)

    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = dtype.itemsize
        for s in shape:
            n *= s
        if size and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _init(n, shapes[n], dtype, gen) for n in names}
        tmp = path / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        plain_mode(tmp)           # safetensors writes 0600
        os.replace(tmp, path / fname)
        weight_map.update({n: fname for n in names})
        nbytes = sum(t.nbytes for t in tensors.values())
        total += nbytes
        if progress is not None:
            progress(nbytes)
        del tensors
    if len(shards) > 1:         # the hub's index: the tensors' total bytes and where each lies
        _write_json(path / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    out = dict(config)
    # the dtype written, whatever the published config says
    out["torch_dtype"] = str(dtype).replace("torch.", "")
    if "dtype" in out:
        out["dtype"] = out["torch_dtype"]
    _write_json(path / "config.json", out)
    return path


def _write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON at `path`, whole or not at all (a unique temporary name beside it)."""
    from ..files import atomic_write

    body = json.dumps(data, indent=2).encode("utf-8")
    atomic_write(path, lambda f: f.write(body))


def checkpoint_bytes(config: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the tensors `write_random_checkpoint` writes for `config`."""
    config_cls, model_cls = family_for(config.get("model_type")).load()
    cfg = config_cls.from_hf(config)
    with torch.device("meta"):
        module = model_cls(cfg)
    n = sum(p.numel() for name, p in module.named_parameters()
            if not (name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False)))
    shp = cfg.experts
    n += shp.num_layers * shp.num_experts * 3 * shp.hidden * shp.inter
    return n * dtype.itemsize


_TOKENIZER_CORPUS = """\
A mixture of experts replaces one large feed-forward block with many smaller ones, and a router
sends every token to a few of them. Offloading keeps attention, norms and embeddings on the
device and brings the experts in from host memory or disk when the router asks for them.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
"""


def write_tokenizer(path: str | os.PathLike, vocab_size: int, specials: dict[str, int],
                    chat_template: str | None = None, max_length: int | None = None,
                    bos_token: str | None = None, eos_token: str | None = None) -> None:
    """A byte-level BPE ``tokenizer.json`` with exactly `vocab_size` ids: the 256 byte symbols,
    merges learnt from a small corpus, the `specials` {content: id} at their published ids, and
    unreachable filler tokens for the rest, so that every embedding row has a token. The
    ``tokenizer_config.json`` names `bos_token` and `eos_token` (both None: the lowest special
    id is BOS and the next EOS, or the only one EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size - len(specials), 600),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer)
    data = json.loads(tok.to_str())
    learnt = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    taken = set(specials.values())
    if any(not 0 <= i < vocab_size for i in taken):
        raise ValueError(f"special token ids {sorted(taken)} fall outside vocab_size {vocab_size}")
    free = (i for i in range(vocab_size) if i not in taken)
    vocab = {}
    old_to_new = {}
    for piece, old in learnt:
        new = next(free)
        vocab[piece] = new
        old_to_new[old] = new
    for i in free:
        vocab[f"<|fill_{i}|>"] = i
    vocab.update(specials)         # in the model's vocabulary too, or loading renumbers them
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}
                            for c, i in sorted(specials.items(), key=lambda kv: kv[1])]
    out = Path(path)
    _write_json(out / "tokenizer.json", data)
    conf = {"model_max_length": max_length} if max_length else {}
    if bos_token is None and eos_token is None and specials:
        names = sorted(specials, key=specials.get)
        bos_token, eos_token = (names[0], names[1]) if len(names) > 1 else (None, names[0])
    for name, content in (("bos_token", bos_token), ("eos_token", eos_token)):
        if content is not None and content not in specials:
            raise ValueError(f"{name} {content!r} is not one of the special tokens")
    if bos_token is not None or eos_token is not None:
        conf["bos_token"], conf["eos_token"] = bos_token, eos_token
    if chat_template:
        conf["chat_template"] = chat_template
    _write_json(out / "tokenizer_config.json", conf)


def _first(ids):
    """The first of an id or a list of ids (None: none)."""
    return ids[0] if isinstance(ids, list) and ids else (ids if isinstance(ids, int) else None)


def synthesize(name: str, dst: str | os.PathLike, layers: int | None = None,
               dtype: torch.dtype = torch.bfloat16, seed: int = 0, shard_bytes: int = 2 * 2**30,
               progress: bool = True, overrides: dict | None = None) -> Path:
    """`fmoe synth`: `name`'s published config.json (``num_hidden_layers`` = `layers` if given),
    random weights in the hub layout (sharded, per-expert keys, index) and a tokenizer whose
    vocabulary matches. Written into a temporary directory beside `dst`, renamed at the end:
    `dst` exists only when complete. Memory stays bounded by one shard. `overrides` replaces
    config fields (tests shrink the shape with it)."""
    import shutil
    import tempfile

    from .published import PUBLISHED, published_config

    config = published_config(name, layers)
    config.update(overrides or {})
    from ..files import unwritable

    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: is a file, not a directory to write the checkpoint in")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: already exists and is not empty")
    why = None if dst.exists() else unwritable(dst)
    if why:
        raise ValueError(f"{dst}: {why}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    total = checkpoint_bytes(config, dtype)
    usage = shutil.disk_usage(dst.parent)
    if usage.free < total * 1.02:
        raise OSError(f"{dst.parent}: {usage.free / 2**30:.1f} GiB free, the checkpoint needs "
                      f"{total / 2**30:.1f} GiB")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    bar = None
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"synth {name} ({config['num_hidden_layers']} layers)")
        write_random_checkpoint(tmp, config, dtype=dtype, seed=seed, shard_bytes=shard_bytes,
                                progress=bar.update if bar is not None else None)
        vocab = config["vocab_size"]
        specials = {c: i for c, i in PUBLISHED[name][2].items() if i < vocab}
        if not specials:          # a shrunk vocabulary (tests): the config's own bos / eos ids
            specials = {t: config[k] for t, k in (("<s>", "bos_token_id"), ("</s>", "eos_token_id"))
                        if isinstance(config.get(k), int) and config[k] < vocab}
        # BOS and EOS are the config's ids (the published tokenizer_config's tokens)
        by_id = {i: c for c, i in specials.items()}
        write_tokenizer(tmp, vocab, specials, chat_template=PUBLISHED[name][3],
                        max_length=config.get("max_position_embeddings"),
                        bos_token=by_id.get(config.get("bos_token_id")),
                        eos_token=by_id.get(_first(config.get("eos_token_id"))))
        _write_json(tmp / "generation_config.json",
                    {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config})
        plain_mode(tmp)           # mkdtemp's 0700 is for the partial directory only
        if dst.exists():
            dst.rmdir()           # empty, checked above
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return dst
