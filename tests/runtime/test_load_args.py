"""`from_pretrained`'s arguments: each bad one is named before anything is read (device, dtype,
the expert cache's form, unknown keywords), the model's own inputs are checked, and the CLI
passes only what it was given (memory-mapped experts from the command line)."""

from __future__ import annotations

import inspect

import pytest
import torch

import fmoe
from fmoe.runtime.lm import RUNTIME_ARGS
from fmoe.runtime.offload import OffloadRuntime, cache_form, parse_capacity
from fmoe.serve import demo
from fmoe.serve.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CACHE", str(tmp_path_factory.mktemp("fmoe-cache")))
        return demo.demo_checkpoint()


@pytest.mark.parametrize("kw, error, needle", [
    ({"device": "mps"}, ValueError, "runs on 'cpu' or 'cuda"),
    ({"device": "meta"}, ValueError, "runs on 'cpu' or 'cuda"),
    ({"device": None}, ValueError, "not a device"),
    ({"device": "gpu0"}, ValueError, "not a device"),
    ({"dtype": torch.float64}, ValueError, "unsupported dtype"),
    ({"dtype": torch.int8}, ValueError, "unsupported dtype"),
    ({"expert_cache": "-1"}, ValueError, "cannot parse '-1'"),
    ({"expert_cache": "1.2.3GiB"}, ValueError, "cannot parse"),
    ({"expert_cache": 0}, ValueError, "count must be >= 1"),
    ({"expert_cache": 1.5}, ValueError, "fraction must be in"),
    ({"expert_cahce": 0.25}, TypeError, "unexpected keyword argument 'expert_cahce'"),
    ({"expert_cache": 0.5, "foo": 1}, TypeError, "unexpected keyword argument 'foo'"),
])
def test_bad_arguments_are_named_before_anything_is_read(tmp_path, kw, error, needle):
    # the path does not exist: an argument error first proves nothing was read
    with pytest.raises(error, match=needle):
        fmoe.models.from_pretrained(tmp_path / "missing", **kw)


def test_cuda_without_cuda_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        fmoe.models.from_pretrained(tmp_path / "missing", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="there are 1 CUDA device"):
        fmoe.models.from_pretrained(tmp_path / "missing", device="cuda:3")


def test_cache_forms_agree_with_the_capacity():
    assert cache_form("auto") == ("auto", None) and cache_form(" MMAP ") == ("mmap", None)
    assert cache_form("0.25") == ("fraction", 0.25) and cache_form("96") == ("count", 96)
    assert cache_form("1MiB") == ("bytes", 1 << 20) and cache_form(".5GB") == ("bytes", 5 * 10 ** 8)
    assert parse_capacity("0.25", 2, 8, 2, 100) == 4 and parse_capacity("1000B", 2, 8, 2, 100) == 10
    for bad in (True, "1.2.3GiB", "-1", "abc", [3], -2, 0.0):
        with pytest.raises(ValueError):
            cache_form(bad)


def test_the_runtime_keywords_are_the_runtimes():
    sig = inspect.signature(OffloadRuntime.__init__).parameters
    own = {"self", "module", "cfg", "layouts", "reader", "device", "dtype", "expert_cache", "policy"}
    assert RUNTIME_ARGS == set(sig) - own


def test_none_is_not_given_without_a_cache(ckpt):
    m = fmoe.models.from_pretrained(ckpt, link_bandwidth=None, trace_path=None)
    assert m.runtime is None
    with pytest.raises(ValueError, match="link_bandwidth needs a managed expert cache"):
        fmoe.models.from_pretrained(ckpt, link_bandwidth="1GB/s")


def test_model_inputs_are_checked(ckpt):
    m = fmoe.models.from_pretrained(ckpt)
    for bad, needle in ((torch.tensor([[1.0, 2.0]]), "integer token ids"), (torch.tensor([1, 2]), "2-D"),
                        (torch.tensor([[9999]]), "outside the vocabulary"),
                        (torch.zeros(1, 0, dtype=torch.long), "empty"), ([[1, 2]], "2-D")):
        with pytest.raises(ValueError, match=needle):
            m(bad)
    with pytest.raises(ValueError, match="2-D"):
        m.generate([[1, 2]], max_new_tokens=1)
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, m.config.vocab_size)


def test_memory_mapped_experts_from_the_command_line(ckpt, capsys):
    args = ["generate", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "3", "--temperature", "0"]
    assert main(args) == 0
    resident = capsys.readouterr().out
    assert main(args + ["--expert-cache", "mmap"]) == 0
    assert capsys.readouterr().out == resident
    assert main(args + ["--expert-cache", "mmap", "--policy", "lru"]) == 1
    assert "--policy needs --expert-cache with a managed cache" in capsys.readouterr().err


def test_generate_takes_eos_and_pad_from_generation_config(ckpt, tmp_path):
    """As HF: generation_config.json's eos list and pad id are generate's defaults (a chat
    model's end-of-turn token is listed there only); the server and chat use the same list."""
    import json
    import shutil

    from fmoe.serve.app import ServerState

    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    free = fmoe.models.from_pretrained(ckpt).generate(ids, 6, eos_token_id=[])
    stop = int(free[0, 4])            # row 0's second new token: make it an end-of-turn token
    assert int(free[0, 3]) != stop
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    cfg_eos = json.loads((dst / "config.json").read_text()).get("eos_token_id")
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop, 511], "pad_token_id": 3,
                                                            "temperature": 0.7}))
    m = fmoe.models.from_pretrained(dst)
    assert m.eos_token_ids == [stop, 511] and m.pad_token_id == 3
    out = m.generate(ids, 6)
    assert out[0, 3:5].tolist() == free[0, 3:5].tolist() and set(out[0, 5:].tolist()) <= {3}
    state = ServerState(m, None, "m", 64)
    assert state.eos_ids == [stop, 511] and state.defaults == {"temperature": 0.7}   # the server's
    (dst / "generation_config.json").unlink()
    m = fmoe.models.from_pretrained(dst)
    assert m.eos_token_ids == ([] if cfg_eos is None else [cfg_eos]) and m.pad_token_id is None


def test_forward_takes_an_attention_mask_as_hf(ckpt):
    """A left-padded batch's logits at its real tokens equal each row's alone."""
    from fmoe.runtime.engine import left_pad

    m = fmoe.models.from_pretrained(ckpt, expert_cache=0.5)
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    ids, valid = left_pad(rows, 0, "cpu")
    out = m(ids, attention_mask=valid.long())
    for b, r in enumerate(rows):
        alone = m(torch.tensor([r]))[0]
        assert torch.allclose(out[b, -len(r):], alone, atol=1e-5), b
    with pytest.raises(ValueError, match="attention_mask shape"):
        m(ids, attention_mask=valid[:, 1:])


def test_a_closed_model_says_so(ckpt):
    m = fmoe.models.from_pretrained(ckpt, expert_cache=0.5)
    m.close()
    m.close()                                   # idempotent
    for call in (lambda: m.generate(torch.tensor([[1, 2]]), 2), lambda: m(torch.tensor([[1, 2]]))):
        with pytest.raises(RuntimeError, match="the model is closed"):
            call()


def test_two_threads_on_one_model_get_what_each_gets_alone(ckpt):
    """The runtime's per-step state is the model's: calls from two threads take turns (they
    gave other tokens, or 'every resident expert is pinned', before)."""
    import threading

    m = fmoe.models.from_pretrained(ckpt, expert_cache=0.25)
    prompts = [torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10, 11, 12]])]
    alone = [m.generate(p, 12, eos_token_id=[]) for p in prompts]
    for _ in range(3):
        got, errors = [None, None], []

        def work(i, got=got, errors=errors):
            try:
                got[i] = m.generate(prompts[i], 12, eos_token_id=[])
            except Exception as e:          # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors and all(torch.equal(g, a) for g, a in zip(got, alone))
    m.close()


def test_fmoe_only_arguments_are_named_alone(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"^map_store needs policy='fmoe' \(--policy fmoe\), not 'lru'"):
        fmoe.models.from_pretrained(ckpt, expert_cache=0.5, policy="lru", map_store=tmp_path / "m.bin")


def test_one_map_store_one_process_at_a_time(ckpt, tmp_path):
    """Two runtimes on one map store would each write over the other's at exit: the second is
    refused by name while the first holds it, and may have it once the first closes."""
    store = tmp_path / "maps.bin"
    first = fmoe.models.from_pretrained(ckpt, expert_cache=0.5, map_store=store)
    with pytest.raises(ValueError, match="maps.bin is in use by another process"):
        fmoe.models.from_pretrained(ckpt, expert_cache=0.5, map_store=store)
    first.close()
    assert store.exists()
    assert not (tmp_path / "maps.bin.lock").exists()        # removed when let go
    second = fmoe.models.from_pretrained(ckpt, expert_cache=0.5, map_store=store)
    second.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.bin"]


def test_a_lock_removed_by_its_last_holder_is_not_taken(tmp_path):
    """A process that opened the lock file before its holder let go (and removed it) must not
    count its lock on the removed file: the lock at the path is taken instead."""
    import os

    from fmoe.files import FileLock

    held = FileLock(tmp_path / "m.bin", "map_store")
    stale = os.open(held.lock, os.O_RDWR)                    # opened before the release
    held.release()
    again = FileLock(tmp_path / "m.bin", "map_store")        # a new file at the path
    import fcntl

    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)       # the removed inode: free, but no lock
    assert os.fstat(stale).st_ino != os.stat(again.lock).st_ino
    with pytest.raises(ValueError, match="in use by another process"):
        FileLock(tmp_path / "m.bin", "map_store")
    os.close(stale)
    again.release()


def test_a_map_store_where_nothing_can_be_written_is_refused(ckpt):
    with pytest.raises(ValueError, match=r"map_store /proc/maps\.npz: "):
        fmoe.models.from_pretrained(ckpt, expert_cache=0.5, map_store="/proc/maps.npz")


def test_a_forked_child_leaves_its_parents_lock_in_place(tmp_path):
    """A forked child that ends (running its copy's release) must not remove the lock file its
    parent still holds: a third process could then take the same store."""
    import os

    from fmoe.files import FileLock

    held = FileLock(tmp_path / "m.bin", "map_store")
    pid = os.fork()
    if pid == 0:                          # the child: lets its copy go, then ends
        held.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.exists(held.lock)
    with pytest.raises(ValueError, match="in use by another process"):
        FileLock(tmp_path / "m.bin", "map_store")
    held.release()
