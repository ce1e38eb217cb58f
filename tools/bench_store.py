"""Converter memory and expert read throughput: fmoe's store against the HF layout, side by side.

    python tools/bench_store.py                     # ~1.3 GB random Mixtral-shaped checkpoint (bf16)
    python tools/bench_store.py --shape tiny        # ~100 MB, a smoke run
    python tools/bench_store.py --fused             # also convert a fused-layout ([E, 2I, H]) copy

1. Writes a random checkpoint (`fmoe.models.synthetic.write_random_checkpoint`, 256 MB shards)
   once into --dir, converts it in a child process and reports the child's peak RSS (VmHWM)
   above its post-import baseline, against the checkpoint size.
2. Reads every routed expert once, in a fixed random order, into preallocated buffers, from:
   the HF layout (one coalesced ``preadv`` per expert; and the old one-``preadv``-per-tensor
   path), the store with O_DIRECT, and the store with buffered reads. "cold" = the files dropped
   from the page cache first (``fsync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)``), "warm" = the
   same pass again right after. Median of --reps passes, GB/s of expert bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # 64 experts of 17.3 MB + 0.17 GB of other weights = 1.28 GB (1.19 GiB) in bf16
    "1gb": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                num_experts_per_tok=2, max_position_embeddings=4096),
    # 16 experts of 0.75 MB + 4 MB of other weights = 16 MB: the default test suite's check
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=1024),
    # 32 experts of 3 MB + 2 MB of other weights = 0.1 GB
    "tiny": dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                 num_experts_per_tok=2, max_position_embeddings=1024),
}
SHARD_BYTES = {"1gb": 256 << 20, "tiny": 32 << 20, "small": 4 << 20}


def write_checkpoint(path: Path, shape: str = "1gb", fused: bool = False) -> Path:
    """A random bf16 Mixtral checkpoint of `shape` at `path` (kept if already complete)."""
    from fmoe.models.synthetic import write_random_checkpoint

    path = Path(path)
    if not (path / "config.json").exists():
        cfg = dict(SHAPES[shape], model_type="mixtral", rope_theta=1e6, rms_norm_eps=1e-5)
        plain = path.with_name(path.name + "-per-expert") if fused else path
        if not (plain / "config.json").exists():
            write_random_checkpoint(plain, cfg, dtype=torch.bfloat16, seed=0, shard_bytes=SHARD_BYTES[shape])
        if fused:
            fuse_checkpoint(plain, path)
    return path


def fuse_checkpoint(src: Path, dst: Path) -> Path:
    """Rewrite a per-expert checkpoint in transformers 5's fused layout: one shard per MoE layer
    holding ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], one for everything else."""
    from safetensors.torch import save_file

    from fmoe.models.checkpoint import CheckpointIndex, FileReader
    from fmoe.models.config import read_config_json
    from fmoe.models.loading import locate_experts, read_expert
    from fmoe.models.registry import family_for

    raw = read_config_json(src)
    cfg = family_for(raw["model_type"]).load()[0].from_hf(raw)
    index = CheckpointIndex(src)
    layouts, used = locate_experts(cfg, index)
    reader = FileReader()
    dst.mkdir(parents=True, exist_ok=True)
    shp = cfg.experts
    weight_map = {}
    n = shp.num_layers + 1
    for layer, row in enumerate(layouts):
        w13 = torch.empty(shp.num_experts, 2 * shp.inter, shp.hidden, dtype=row[0].dtype)
        w2 = torch.empty(shp.num_experts, shp.hidden, shp.inter, dtype=row[0].dtype)
        for e, lay in enumerate(row):
            read_expert(reader, lay, w13[e], w2[e])
        gu, d = cfg.fused_expert_keys(layer)
        name = f"model-{layer + 1:05d}-of-{n:05d}.safetensors"
        save_file({gu: w13, d: w2}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({gu: name, d: name})
        del w13, w2
    rest = {k: reader.read(index[k]) for k in index.keys() if k not in used}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file({k.replace(".block_sparse_moe.", ".mlp."): v for k, v in rest.items()}, str(dst / name),
              metadata={"format": "pt"})
    weight_map.update({k.replace(".block_sparse_moe.", ".mlp."): name for k in rest})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())
    reader.close()
    return dst


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


_CHILD = r"""
import json, sys, time
import torch, tqdm, fmoe.models.convert as convert, fmoe.models.mixtral  # everything conversion imports
with torch.device("meta"):   # torch imports its meta-device init kernels lazily (~150 MB, once)
    torch.nn.Embedding(2, 2)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmHWM")
t0 = time.perf_counter()
convert.convert(sys.argv[1], sys.argv[2], progress=False, force=True, chunk_bytes=int(sys.argv[3]))
print(json.dumps({"baseline_rss": base, "peak_rss": status("VmHWM"), "seconds": time.perf_counter() - t0}))
"""


def measure_convert_rss(src: Path, dst: Path, chunk_bytes: int | None = None) -> dict:
    """Convert `src` -> `dst` in a child process; its peak RSS (VmHWM) before (after imports)
    and after, and the growth."""
    from fmoe.models.convert import CHUNK_BYTES

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst),
                        str(chunk_bytes or CHUNK_BYTES)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"conversion child failed:\n{r.stderr}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["peak_rss_growth"] = out["peak_rss"] - out["baseline_rss"]
    out["checkpoint_bytes"] = checkpoint_bytes(src)
    out["chunk_bytes"] = chunk_bytes or CHUNK_BYTES
    return out


# -- read throughput ---------------------------------------------------------------------------

def drop_cache(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sources(src: Path, store: Path, fused: Path | None = None):
    """(label, layouts, reader factory, read function, files) for each way of reading experts."""
    from fmoe.models.checkpoint import CheckpointIndex, FileReader
    from fmoe.models.config import read_config_json
    from fmoe.models.loading import locate_experts, read_expert
    from fmoe.models.registry import family_for
    from fmoe.models.store_format import open_store

    raw = read_config_json(src)
    cfg = family_for(raw["model_type"]).load()[0].from_hf(raw)
    hf_layouts, _ = locate_experts(cfg, CheckpointIndex(src))
    st = open_store(store)
    st_layouts, _ = st.layouts(cfg)
    hf_files = sorted(src.glob("*.safetensors"))

    def per_segment(reader, lay, w13, w2):        # the read path before coalescing
        for segs, out in ((lay.w13, w13), (lay.w2, w2)):
            flat = out.view(torch.uint8).reshape(-1)
            pos = 0
            for s in segs:
                reader.read_into(s.info, flat[pos:pos + s.nbytes], s.byte_offset, s.nbytes)
                pos += s.nbytes

    def direct_reader():
        r = FileReader()
        if not r.use_direct(st.blob) or not r.is_direct(st.blob):
            return None
        return r

    extra = []
    if fused is not None:
        fu_layouts, _ = locate_experts(cfg, CheckpointIndex(fused))
        extra = [("HF safetensors, fused [E, 2I, H] + [E, H, I] (2 preadv per expert)", fu_layouts,
                  FileReader, read_expert, sorted(fused.glob("*.safetensors")), False)]
    return cfg, [
        ("HF safetensors, per-expert keys, one preadv per tensor (before)", hf_layouts, FileReader,
         per_segment, hf_files, False),
        ("HF safetensors, per-expert keys, one preadv per expert", hf_layouts, FileReader, read_expert,
         hf_files, False),
        *extra,
        ("fmoe store, buffered", st_layouts, FileReader, read_expert, [st.blob], False),
        ("fmoe store, O_DIRECT (bounce buffer)", st_layouts, direct_reader, read_expert, [st.blob], False),
        ("fmoe store, O_DIRECT (4 KiB-aligned buffers, as pinned memory)", st_layouts, direct_reader,
         read_expert, [st.blob], True),
    ]


def _buffers(shape13, shape2, dtype, aligned: bool):
    if not aligned:
        return torch.empty(shape13, dtype=dtype), torch.empty(shape2, dtype=dtype)
    from fmoe.models.checkpoint import ALIGN

    n13 = shape13[0] * shape13[1] * dtype.itemsize
    n2 = shape2[0] * shape2[1] * dtype.itemsize
    raw = torch.empty(n13 + n2 + 2 * ALIGN, dtype=torch.uint8)
    base = -raw.data_ptr() % ALIGN
    b13 = raw[base:base + n13]
    start2 = base + n13 + (-(n13) % ALIGN)
    b2 = raw[start2:start2 + n2]
    return b13.view(dtype).view(shape13), b2.view(dtype).view(shape2)


def read_throughput(src: Path, store: Path, reps: int = 3, seed: int = 0, fused: Path | None = None) -> list[dict]:
    """GB/s reading every expert once in a fixed random order, cold and warm, per source; the
    sources take turns within each repetition so that background load hits them alike."""
    cfg, sources = _sources(Path(src), Path(store), fused)
    shp = cfg.experts
    order = [(l, e) for l in range(shp.num_layers) for e in range(shp.num_experts)]
    random.Random(seed).shuffle(order)
    speeds: dict[tuple[int, str], list[float]] = {}
    rows = []
    for label, layouts, make_reader, _read, _files, _aligned in sources:
        row = {"source": label, "experts": len(order), "expert_mb": layouts[0][0].nbytes / 1e6}
        probe = make_reader()
        if probe is None:
            row.update(cold_gbps=None, warm_gbps=None, note="O_DIRECT not supported here")
        else:
            probe.close()
        rows.append(row)

    def one_pass(layouts, make_reader, read, bufs) -> float:
        reader = make_reader()
        total = sum(layouts[l][e].nbytes for l, e in order)
        t0 = time.perf_counter()
        for l, e in order:
            read(reader, layouts[l][e], *bufs)
        dt = time.perf_counter() - t0
        reader.close()
        return total / dt / 1e9

    for _ in range(reps):
        for i, (_label, layouts, make_reader, read, files, aligned) in enumerate(sources):
            if "note" in rows[i]:
                continue
            bufs = _buffers((2 * shp.inter, shp.hidden), (shp.hidden, shp.inter), layouts[0][0].dtype, aligned)
            drop_cache(files)
            speeds.setdefault((i, "cold"), []).append(one_pass(layouts, make_reader, read, bufs))
            one_pass(layouts, make_reader, read, bufs)             # fill the page cache
            speeds.setdefault((i, "warm"), []).append(one_pass(layouts, make_reader, read, bufs))
    for (i, mode), v in speeds.items():
        row = rows[i]
        row[f"{mode}_gbps"] = statistics.median(v)
        row[f"{mode}_gbps_range"] = [min(v), max(v)]
        row[f"{mode}_ms_per_expert"] = row["expert_mb"] / 1e3 / row[f"{mode}_gbps"] * 1e3
    return rows


def _fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1gb")
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "fmoe" / "bench-store", help="where checkpoints and stores are kept")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fused", action="store_true", help="also measure converting a fused-layout source")
    p.add_argument("--reads-only", action="store_true", help="skip the conversion (store already built)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)

    base = args.dir / args.shape
    t0 = time.perf_counter()
    src = write_checkpoint(base / "hf", args.shape)
    print(f"checkpoint: {src} ({checkpoint_bytes(src) / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
    results = {"shape": args.shape, "checkpoint_bytes": checkpoint_bytes(src), "convert": []}
    sources = [("per-expert keys", src)]
    if args.fused:
        sources.append(("fused [E, 2I, H]", write_checkpoint(base / "hf-fused", args.shape, fused=True)))
    for label, path in ([] if args.reads_only else sources):
        r = measure_convert_rss(path, base / ("store" if path == src else "store-fused"))
        r["source"] = label
        results["convert"].append(r)
    if not (base / "store" / "fmoe-store.json").exists():
        raise SystemExit(f"{base / 'store'}: no store yet; run without --reads-only first")
    results["reads"] = read_throughput(src, base / "store", reps=args.reps,
                                       fused=sources[1][1] if args.fused else None)

    gib = 2 ** 30
    if results["convert"]:
        print(f"\n### Converter peak memory ({args.shape}: {results['checkpoint_bytes'] / gib:.2f} GiB checkpoint)\n")
        print("| source | checkpoint GiB | import baseline MiB | peak RSS growth MiB | growth / checkpoint | time s |")
        print("|---|---:|---:|---:|---:|---:|")
    for r in results["convert"]:
        print(f"| {r['source']} | {r['checkpoint_bytes'] / gib:.2f} | {r['baseline_rss'] / 2**20:.0f} | "
              f"{r['peak_rss_growth'] / 2**20:.0f} | {r['peak_rss_growth'] / r['checkpoint_bytes']:.1%} | "
              f"{r['seconds']:.1f} |")
    print(f"\n### Expert reads ({results['reads'][0]['experts']} experts of "
          f"{results['reads'][0]['expert_mb']:.1f} MB, random order, median of {args.reps})\n")
    print("| source | cold GB/s (min-max) | cold ms/expert | warm GB/s (min-max) | warm ms/expert |")
    print("|---|---:|---:|---:|---:|")
    for r in results["reads"]:
        rng = {m: "" if r.get(f"{m}_gbps_range") is None else
               f" ({r[f'{m}_gbps_range'][0]:.2f}-{r[f'{m}_gbps_range'][1]:.2f})" for m in ("cold", "warm")}
        print(f"| {r['source']} | {_fmt(r.get('cold_gbps'))}{rng['cold']} | {_fmt(r.get('cold_ms_per_expert'), 1)} | "
              f"{_fmt(r.get('warm_gbps'))}{rng['warm']} | {_fmt(r.get('warm_ms_per_expert'), 1)} |")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
