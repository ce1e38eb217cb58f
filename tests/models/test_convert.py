"""The checkpoint converter and fmoe's expert-major store: parity with the source checkpoint for
every family (per-expert and fused sources, offloaded and resident), the store layout, one read
per expert, O_DIRECT fallback, corrupt / truncated stores, interrupted conversions, the CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fmoe  # noqa: E402
from fmoe.errors import CheckpointError, ConfigError, FmoeError  # noqa: E402
from fmoe.models import convert as conv  # noqa: E402
from fmoe.models import loading  # noqa: E402
from fmoe.models import store_format as sf  # noqa: E402
from fmoe.models.checkpoint import ALIGN, FileReader  # noqa: E402
from fmoe.models.registry import FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# -- tiny random transformers models, one per family --------------------------------------------

MLA = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
           n_shared_experts=2, first_k_dense_replace=1)

SPECS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(MLA, q_lora_rank=None, topk_method="greedy")),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(MLA, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         norm_topk_prob=True)),
}
FAMILY_NAMES = [f for f in SPECS if f in FAMILIES]


def tiny_hf(family: str, seed: int = 0):
    """A random fp32 transformers model of `family`, weights drawn wide enough that routing
    varies across tokens (norm weights around 1)."""
    config_name, model_name, kw = SPECS[family]
    config = getattr(transformers, config_name)(vocab_size=128, eos_token_id=None, bos_token_id=None,
                                                pad_token_id=None, tie_word_embeddings=False, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def save(model, path: Path, fused: bool = False, **kw) -> Path:
    if fused:
        kw["save_original_format"] = False
    model.save_pretrained(path, **kw)
    return Path(path)


def ids(batch=2, length=7, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def mixtral_src(tmp_path_factory):
    """A tiny per-expert Mixtral checkpoint with tokenizer-like side files."""
    from tokenizers import Tokenizer, models

    path = save(tiny_hf("mixtral"), tmp_path_factory.mktemp("mixtral-src"))
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (path / "special_tokens_map.json").write_text("{}")
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "README.md").write_text("not copied")
    return path


@pytest.fixture(scope="module")
def mixtral_store(mixtral_src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("mixtral-store") / "store"
    conv.convert(mixtral_src, dst, progress=False)
    return dst


@pytest.fixture
def store(mixtral_store, tmp_path):
    """A private copy of the converted Mixtral store, for tests that damage it."""
    return Path(shutil.copytree(mixtral_store, tmp_path / "store"))


# -- parity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_converted_store_matches_source(tmp_path, family, layout):
    hf = tiny_hf(family)
    src = save(hf, tmp_path / "src", fused=(layout == "fused"))
    names = list(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (src / "model.safetensors.index.json").exists() else None
    if layout == "fused" and names is None:
        from safetensors import safe_open
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            names = list(f.keys())
        assert any(n.endswith("gate_up_proj") for n in names)        # really the fused layout
    out = conv.convert(src, tmp_path / "dst", progress=False, verify=True)
    shp = fmoe.models.from_pretrained(src).config.experts
    assert out["experts"] == shp.num_layers * shp.num_experts

    x = ids()
    ref = fmoe.models.from_pretrained(src)                         # source, all experts resident
    want_logits = ref(x)
    want_tokens = ref.generate(x, max_new_tokens=5)
    dst_off = fmoe.models.from_pretrained(tmp_path / "dst", expert_cache=0.25, policy="lru")
    got = dst_off(x)
    assert got.dtype == torch.float32 and max_diff(got, want_logits) <= 1e-6
    assert torch.equal(dst_off.generate(x, max_new_tokens=5), want_tokens)
    stats = dst_off.expert_stats()
    assert stats["capacity"] == int(0.25 * shp.num_layers * shp.num_experts) and stats["misses"] > 0
    dst_off.close()
    assert max_diff(fmoe.models.from_pretrained(tmp_path / "dst")(x), want_logits) <= 1e-6   # resident


@pytest.mark.parametrize("family", [f for f in ("mixtral", "deepseek_v3") if f in FAMILIES])
def test_convert_dtype_equals_loading_source_in_that_dtype(tmp_path, family):
    """--dtype bfloat16: experts and the weights fmoe holds in bf16 are converted; a float32
    router (DeepSeek) stays float32, so DST equals SRC loaded with dtype=bfloat16, exactly."""
    src = save(tiny_hf(family), tmp_path / "src")
    conv.convert(src, tmp_path / "dst", dtype="bfloat16", progress=False)
    store = sf.open_store(tmp_path / "dst")
    assert store.dtype == store.expert_dtype == torch.bfloat16
    assert (tmp_path / "dst" / "experts.bin").stat().st_size < (tmp_path / "src" / "model.safetensors").stat().st_size
    from safetensors import safe_open
    with safe_open(str(tmp_path / "dst" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    if family == "deepseek_v3":
        assert dtypes["model.layers.1.mlp.gate.weight"] == "F32"
        assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    x = ids()
    want = fmoe.models.from_pretrained(src, dtype=torch.bfloat16)
    got = fmoe.models.from_pretrained(tmp_path / "dst", expert_cache=0.25, policy="lru")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got(x), want(x))
    x = x[:1, :5]
    assert torch.equal(got.generate(x, max_new_tokens=3), want.generate(x, max_new_tokens=3))
    got.close()


# -- the store's layout ------------------------------------------------------------------------

def test_store_layout(mixtral_src, mixtral_store):
    from safetensors import safe_open
    from safetensors.torch import load_file

    dst = mixtral_store
    index = json.loads((dst / sf.INDEX_FILE).read_text())
    assert index["format"] == "fmoe-store" and index["version"] == 1 and index["alignment"] == 4096
    blob = (dst / "experts.bin").read_bytes()
    assert blob[:8] == b"FMOEBLOB" and blob[16:48].decode() == index["store_id"]
    assert len(blob) == index["blob"]["size"] and len(blob) % ALIGN == 0
    src = load_file(str(mixtral_src / "model.safetensors"))
    E, (_I2, _H) = index["experts"]["num_experts"], index["experts"]["w13_shape"]
    assert len(index["entries"]) == index["experts"]["num_layers"] * E
    for ent in index["entries"]:
        assert ent["offset"] % ALIGN == 0 and ent["length"] == index["experts"]["expert_bytes"]
        data = blob[ent["offset"]:ent["offset"] + ent["length"]]
        assert zlib.crc32(data) == ent["crc32"]
        p = f"model.layers.{ent['layer']}.block_sparse_moe.experts.{ent['expert']}"
        want = torch.cat([src[f"{p}.w1.weight"].flatten(), src[f"{p}.w3.weight"].flatten(),   # gate, up
                          src[f"{p}.w2.weight"].flatten()])                                   # down
        assert torch.equal(torch.frombuffer(bytearray(data), dtype=torch.float32), want)
    # non-expert weights: a plain safetensors file, fmoe parameter names, no expert tensors
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), src["model.embed_tokens.weight"])
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys and not any(".experts." in k for k in keys)
    # side files copied byte for byte; config.json the same model; README not copied
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (dst / name).read_bytes() == (mixtral_src / name).read_bytes(), name
    assert not (dst / "README.md").exists() and not (dst / "model.safetensors.index.json").exists()
    assert json.loads((dst / "config.json").read_text()) == json.loads((mixtral_src / "config.json").read_text())
    assert conv.verify_store(dst)["experts"] == len(index["entries"])


def test_store_to_store_and_sharded_source(tmp_path):
    """A sharded source converts; an fmoe store is itself a valid source (e.g. to change dtype)."""
    hf = tiny_hf("mixtral", seed=3)
    src = save(hf, tmp_path / "src", max_shard_size="20KB")
    assert len(list(src.glob("*.safetensors"))) > 3
    conv.convert(src, tmp_path / "a", progress=False)
    conv.convert(tmp_path / "a", tmp_path / "b", dtype="float16", progress=False)
    x = ids()
    want = fmoe.models.from_pretrained(src, dtype=torch.float16)(x)
    assert torch.equal(fmoe.models.from_pretrained(tmp_path / "b")(x), want)


# -- reads -------------------------------------------------------------------------------------

class CountReads:
    def __init__(self, monkeypatch):
        self.calls = []
        real = os.preadv

        def preadv(fd, buffers, offset, *a):
            self.calls.append((offset, len(buffers)))
            return real(fd, buffers, offset, *a)

        monkeypatch.setattr(os, "preadv", preadv)


@pytest.mark.parametrize("direct", ["1", "0"])
def test_one_read_per_expert_from_store(mixtral_store, monkeypatch, direct):
    monkeypatch.setenv("FMOE_DIRECT_IO", direct)
    cfg, _, _, layouts, _, reader = loading.build_model(mixtral_store, torch.device("cpu"), None)
    blob = mixtral_store / "experts.bin"
    assert reader.is_direct(blob) == (direct == "1" and hasattr(os, "O_DIRECT") and _fs_allows_direct(blob))
    shp = cfg.experts
    count = CountReads(monkeypatch)
    for layer in range(shp.num_layers):
        for e in range(shp.num_experts):
            w13 = torch.empty(2 * shp.inter, shp.hidden)
            w2 = torch.empty(shp.hidden, shp.inter)
            before = len(count.calls)
            loading.read_expert(reader, layouts[layer][e], w13, w2)
            assert len(count.calls) == before + 1
            ent = sf.open_store(mixtral_store).entries[layer][e]
            raw = blob.read_bytes()[ent.offset:ent.offset + ent.length]
            assert torch.cat([w13.flatten(), w2.flatten()]).numpy().tobytes() == raw
    reader.close()


def _fs_allows_direct(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("family", [f for f in ("mixtral", "qwen3_moe") if f in FAMILIES])
def test_hf_expert_tensors_side_by_side_are_one_read(tmp_path, family, monkeypatch):
    """gate/up/down of one expert are adjacent in an HF file (in any order): one preadv."""
    src = save(tiny_hf(family), tmp_path / "src")
    cfg, _, _, layouts, _, reader = loading.build_model(src, torch.device("cpu"), None)
    shp = cfg.experts
    w13, w2 = torch.empty(2 * shp.inter, shp.hidden), torch.empty(shp.hidden, shp.inter)
    count = CountReads(monkeypatch)
    loading.read_expert(reader, layouts[0][3], w13, w2)
    assert len(count.calls) == 1 and count.calls[0][1] == 3
    from safetensors.torch import load_file
    t = load_file(str(src / "model.safetensors"))
    g, u, d = cfg.expert_keys(0, 3)
    assert torch.equal(w13, torch.cat([t[g], t[u]])) and torch.equal(w2, t[d])


def test_direct_io_refused_falls_back_to_buffered(mixtral_store, monkeypatch):
    x = ids()
    want = fmoe.models.from_pretrained(mixtral_store)(x)
    real_open = os.open

    def no_direct(path, flags, *a, **k):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_direct)
    model = fmoe.models.from_pretrained(mixtral_store, expert_cache=0.25, policy="lru")
    assert not model.runtime.store.reader.is_direct(mixtral_store / "experts.bin")
    assert torch.equal(model(x), want)
    model.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")
def test_direct_io_refused_at_read_time_falls_back(mixtral_store, monkeypatch):
    reader = FileReader()
    blob = mixtral_store / "experts.bin"
    reader.use_direct(blob)
    if not reader.is_direct(blob):
        pytest.skip("this filesystem refuses O_DIRECT")
    real = os.preadv
    calls = []

    def refuse(fd, bufs, off, *a):
        calls.append(fd)
        if len(calls) == 1:                          # the first (O_DIRECT) read is refused
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off, *a)

    monkeypatch.setattr(os, "preadv", refuse)
    out = bytearray(100)
    reader.readv(blob, 5000, [out])
    assert bytes(out) == blob.read_bytes()[5000:5100] and not reader.is_direct(blob)
    reader.close()


@pytest.mark.parametrize("direct", [True, False])
def test_readv_any_offset_and_buffers(tmp_path, direct, monkeypatch):
    from fmoe.models import checkpoint

    monkeypatch.setattr(checkpoint, "BOUNCE_BYTES", 2 * ALIGN)    # several bounce pieces per read
    data = os.urandom(5 * ALIGN + 123)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    reader = FileReader()
    if direct:
        reader.use_direct(f)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        off = int(torch.randint(0, len(data) - 1, (1,), generator=g))
        sizes = [int(s) for s in torch.randint(0, 3000, (3,), generator=g)]
        sizes[-1] = max(1, min(sizes[-1], len(data) - off - sum(sizes[:-1])))
        if sum(sizes) > len(data) - off:
            continue
        bufs = [torch.empty(s, dtype=torch.uint8) for s in sizes]
        reader.readv(f, off, bufs)
        assert b"".join(b.numpy().tobytes() for b in bufs) == data[off:off + sum(sizes)]
    with pytest.raises(CheckpointError, match="unexpected end of file"):
        reader.readv(f, len(data) - 10, [bytearray(20)], "the tail")
    reader.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")
def test_direct_io_modes(tmp_path, monkeypatch):
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(ALIGN))
    for mode, want in (("0", False), ("off", False), ("auto", False), ("1", True)):  # auto: f << RAM / 2
        monkeypatch.setenv("FMOE_DIRECT_IO", mode)
        assert FileReader().use_direct(f) == want, mode
    monkeypatch.delenv("FMOE_DIRECT_IO")
    assert not FileReader().use_direct(f)                                 # the default: auto


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")
def test_direct_read_into_aligned_buffers_needs_no_bounce(tmp_path):
    data = os.urandom(6 * ALIGN)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    reader = FileReader()
    reader.use_direct(f)
    if not reader.is_direct(f):
        pytest.skip("this filesystem refuses O_DIRECT")
    raw = torch.empty(5 * ALIGN, dtype=torch.uint8)
    base = -raw.data_ptr() % ALIGN
    a, b = raw[base:base + ALIGN], raw[base + ALIGN:base + 3 * ALIGN]     # 4096-aligned, like pinned memory
    reader.readv(f, ALIGN, [a, b])
    assert a.numpy().tobytes() + b.numpy().tobytes() == data[ALIGN:4 * ALIGN]
    assert getattr(reader._local, "view", None) is None                   # no bounce buffer used
    reader.readv(f, ALIGN + 1, [raw[:100]])
    assert raw[:100].numpy().tobytes() == data[ALIGN + 1:ALIGN + 101]
    assert reader._local.view.nbytes == ALIGN                              # one page: [4096, 8192)
    reader.close()


# -- damaged stores -----------------------------------------------------------------------------

def _index(store: Path) -> dict:
    return json.loads((store / sf.INDEX_FILE).read_text())


def _write_index(store: Path, index: dict) -> None:
    (store / sf.INDEX_FILE).write_text(json.dumps(index))


def test_truncated_blob_names_the_expert(store):
    index = _index(store)
    last = max(index["entries"], key=lambda e: e["offset"])
    with open(store / "experts.bin", "r+b") as f:
        f.truncate(last["offset"] + 100)
    label = f"expert {last['expert']} of layer {last['layer']}"
    with pytest.raises(CheckpointError, match=f"truncated: {label} needs bytes"):
        fmoe.models.from_pretrained(store)
    with pytest.raises(CheckpointError, match="truncated"):
        fmoe.models.from_pretrained(store, expert_cache=0.25, policy="lru")
    (store / "experts.bin").unlink()
    with pytest.raises(CheckpointError, match="experts.bin: cannot read"):
        fmoe.models.from_pretrained(store)


def test_corrupt_expert_bytes_name_the_expert(store, monkeypatch):
    ent = _index(store)["entries"][5]
    with open(store / "experts.bin", "r+b") as f:
        f.seek(ent["offset"] + 77)
        b = f.read(1)
        f.seek(ent["offset"] + 77)
        f.write(bytes([b[0] ^ 0xFF]))
    label = f"expert {ent['expert']} of layer {ent['layer']}"
    with pytest.raises(CheckpointError, match=f"checksum mismatch in {label}"):
        conv.verify_store(store)
    fmoe.models.from_pretrained(store)            # structure is fine: checksums are opt-in at load
    monkeypatch.setenv("FMOE_VERIFY_READS", "1")
    with pytest.raises(CheckpointError, match=f"checksum mismatch in {label}"):
        fmoe.models.from_pretrained(store)


@pytest.mark.parametrize("damage, message", [
    ("not json", "corrupt store index \\(not valid JSON"),
    ("misaligned", "corrupt store index: expert 2 of layer 1 at offset \\d+ is not 4096-aligned"),
    ("missing", "corrupt store index: no entry for expert 2 of layer 1"),
    ("duplicate", "expert 2 of layer 1 is listed twice"),
    ("length", "expert 2 of layer 1 has length"),
    ("overlap", "overlaps"),
    ("field", "corrupt store index \\(entry \\d+"),
    ("version", "store version 99 is newer"),
    ("store_id", "blob and index come from different conversions"),
    ("shape", "the store holds 2 MoE layers x 8 experts of hidden 32, inter 40"),
])
def test_corrupt_index_is_a_clear_error(store, damage, message):
    index = _index(store)
    k = next(i for i, e in enumerate(index["entries"]) if (e["moe_layer"], e["expert"]) == (1, 2))
    ent = index["entries"][k]
    if damage == "not json":
        (store / sf.INDEX_FILE).write_text(json.dumps(index)[:-40])
    else:
        if damage == "misaligned":
            ent["offset"] += 8
        elif damage == "missing":
            del index["entries"][k]
        elif damage == "duplicate":
            index["entries"].append(dict(ent))
        elif damage == "length":
            ent["length"] -= 4
        elif damage == "overlap":
            ent["offset"] = index["entries"][k - 1]["offset"]
        elif damage == "field":
            del ent["crc32"]
        elif damage == "version":
            index["version"] = 99
        elif damage == "store_id":
            index["store_id"] = "0" * 32
        elif damage == "shape":
            index["experts"]["inter"] = 40
            for e in index["entries"]:
                e["length"] = 3 * 40 * 32 * 4
        _write_index(store, index)
    with pytest.raises(CheckpointError, match=message):
        fmoe.models.from_pretrained(store)


def test_damaged_store_cli_error_is_one_line(store, capsys):
    from fmoe.serve.cli import main

    with open(store / "experts.bin", "r+b") as f:
        f.truncate(3 * ALIGN)
    assert main(["generate", str(store), "--prompt", "hi"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "truncated: expert" in lines[0] and "Traceback" not in lines[0]


# -- interrupted conversions, overwrite, CLI ----------------------------------------------------

@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing_that_loads(mixtral_src, tmp_path, monkeypatch, exc):
    dst = tmp_path / "dst"
    real = conv._write_expert
    seen = []

    def dying(*a, **k):
        seen.append(1)
        if len(seen) == 5:
            (tmp,) = tmp_path.glob(".dst.*.tmp")
            with pytest.raises(FmoeError):                # what a kill -9 now would leave behind
                fmoe.models.from_pretrained(tmp)
            raise exc("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(conv, "_write_expert", dying)
    with pytest.raises(exc):
        conv.convert(mixtral_src, dst, progress=False)
    assert not dst.exists() and not list(tmp_path.iterdir())


def test_stale_tmp_is_not_loadable(mixtral_src, tmp_path, monkeypatch):
    """A conversion killed before config.json was written: its temporary directory does not
    load; the next conversion uses a directory of its own and succeeds."""
    dst = tmp_path / "dst"
    monkeypatch.setattr(conv, "_remove", lambda path: None)         # as if killed: no clean-up
    monkeypatch.setattr(conv, "_write_index", lambda *a: (_ for _ in ()).throw(SystemExit(9)))
    with pytest.raises(SystemExit):
        conv.convert(mixtral_src, dst, progress=False)
    monkeypatch.undo()
    (tmp,) = tmp_path.glob(".dst.*.tmp")
    assert (tmp / "experts.bin").exists() and (tmp / "model.safetensors").exists() and not dst.exists()
    with pytest.raises(ConfigError, match="config.json: missing"):
        fmoe.models.from_pretrained(tmp)
    conv.convert(mixtral_src, dst, progress=False)
    assert sf.open_store(dst) is not None


def test_refuses_to_overwrite_without_force(mixtral_src, tmp_path, capsys):
    from fmoe.serve.cli import main

    dst = tmp_path / "dst"
    assert main(["convert", str(mixtral_src), str(dst), "--no-progress"]) == 0
    first = _index(dst)["store_id"]
    capsys.readouterr()
    assert main(["convert", str(mixtral_src), str(dst), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--force" in err[0]
    assert _index(dst)["store_id"] == first
    assert main(["convert", str(mixtral_src), str(dst), "--force", "--verify", "--no-progress",
                 "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "checksums verified" in out and "float16" in out
    assert _index(dst)["store_id"] != first and not list(tmp_path.glob(".dst.*"))
    # never into (or around) the source
    assert main(["convert", str(mixtral_src), str(mixtral_src / "sub"), "--force"]) == 1
    assert "must not contain, or be inside" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()


def test_tools_convert_script(mixtral_src, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), str(mixtral_src),
                        str(tmp_path / "dst"), "--verify"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "checksums verified" in r.stdout and "convert dst" in r.stderr      # the progress bar
    assert sf.open_store(tmp_path / "dst") is not None
    assert conv.main([str(mixtral_src), str(tmp_path / "dst")]) == 1     # the script's main, in-process


# -- memory ------------------------------------------------------------------------------------

def _bench():
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_store
    return bench_store


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_convert_streams_in_bounded_chunks(mixtral_src, mixtral_store, tmp_path, monkeypatch, dtype):
    """Every read the converter makes is at most `chunk_bytes` (tensors and experts are larger),
    and chunked output is byte-identical to the unchunked one. (Peak RSS on a >= 1 GB
    checkpoint: the slow test below and tools/bench_store.py.)"""
    sizes = []
    real = FileReader.readv

    def readv(self, file, offset, buffers, what=""):
        sizes.append(sum(b.numel() * b.element_size() if isinstance(b, torch.Tensor) else len(b)
                         for b in buffers))
        return real(self, file, offset, buffers, what)

    ref = mixtral_store
    if dtype is not None:
        ref = tmp_path / "ref"
        conv.convert(mixtral_src, ref, dtype=dtype, progress=False)
    monkeypatch.setattr(FileReader, "readv", readv)
    conv.convert(mixtral_src, tmp_path / "dst", dtype=dtype, progress=False, chunk_bytes=1024)
    monkeypatch.undo()
    assert 0 < max(sizes) <= 1024 and len(sizes) > 100
    a, b = (ref / "experts.bin").read_bytes(), (tmp_path / "dst" / "experts.bin").read_bytes()
    assert a[ALIGN:] == b[ALIGN:]                           # the header page differs in the store id
    assert (ref / "model.safetensors").read_bytes() == (tmp_path / "dst" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_convert_memory_is_bounded_1gb(tmp_path):
    b = _bench()
    src = b.write_checkpoint(tmp_path / "src", "1gb")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size >= 2**30
    r = b.measure_convert_rss(src, tmp_path / "dst")
    assert r["peak_rss_growth"] < 0.25 * size, (r, size)
    conv.verify_store(tmp_path / "dst")


def test_force_replaces_only_an_fmoe_store(mixtral_src, tmp_path, capsys):
    """--force never deletes what fmoe did not write: a folder of the user's, a file, a plain
    HF checkpoint; an unrelated DST.tmp beside DST is left alone too."""
    from fmoe.serve.cli import main

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("\\section{Intro}")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    hf_copy = Path(shutil.copytree(mixtral_src, tmp_path / "hf"))
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "fmoe-store.json").write_text('{"format": "something-else"}')
    for victim in (thesis, notes, hf_copy, fake):
        before = sorted(p.name for p in victim.iterdir()) if victim.is_dir() else victim.read_text()
        capsys.readouterr()
        assert main(["convert", str(mixtral_src), str(victim), "--force", "--no-progress"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not an fmoe store" in err[0] and "--force only replaces" in err[0]
        after = sorted(p.name for p in victim.iterdir()) if victim.is_dir() else victim.read_text()
        assert after == before
    # a user's DST.tmp (the old fixed temporary name) is not deleted, with or without --force
    dst = tmp_path / "dst"
    mine = tmp_path / "dst.tmp"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2,3")
    assert main(["convert", str(mixtral_src), str(dst), "--no-progress"]) == 0
    assert main(["convert", str(mixtral_src), str(dst), "--force", "--no-progress"]) == 0
    assert (mine / "data.csv").read_text() == "1,2,3"
    assert sf.open_store(dst) is not None
    assert not list(tmp_path.glob(".dst.*"))


def test_a_destination_that_cannot_be_created_is_named(mixtral_src, tmp_path, capsys, monkeypatch):
    """DST's directory cannot take DST: one line naming DST (was the OSError of the temporary
    directory's name), before the source is resolved (a hub id would be downloaded first)."""
    from fmoe.serve.cli import main

    (tmp_path / "afile").write_text("")
    dst = tmp_path / "afile" / "conv"
    with pytest.raises(conv.ConvertError, match=f"{dst}: cannot create the output next to it"):
        conv.convert(mixtral_src, dst, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(conv.ConvertError, match=f"{dst}: cannot create"):
        conv.convert("someone/not-downloaded", dst, progress=False)
    if os.path.isdir("/proc/self"):
        # /proc takes no new directory, whoever asks (permission bits would not tell for root)
        assert main(["convert", str(mixtral_src), "/proc/conv", "--no-progress"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "/proc/conv: cannot create the output next to it" in err[0], err
        assert ".tmp" not in err[0]
        # and where the directory fails only when the output is made (after the early check)
        monkeypatch.setattr(conv, "_check_dst_parent", lambda dst: None)
        with pytest.raises(conv.ConvertError, match="/proc/conv: cannot create the output next to it"):
            conv.convert(mixtral_src, "/proc/conv", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_cli_dtype_names_are_the_converters():
    """The command line's --dtype names (`convert_cli`, no torch import) are the converter's."""
    from fmoe.models.convert_cli import DTYPE_NAMES

    assert sorted(DTYPE_NAMES) == sorted(conv.DTYPE_CHOICES)


def test_the_command_line_starts_without_torch():
    """`fmoe --help` and every sub-command's parser build without importing torch (seconds on a
    small machine)."""
    import subprocess
    import sys

    code = ("import sys; from fmoe.serve.cli import build_parser; build_parser(); "
            "import fmoe, fmoe.sim; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
