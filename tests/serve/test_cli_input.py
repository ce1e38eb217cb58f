"""What the CLI does with awkward input: --debug on either side of the sub-command, chat lines
that are not text, and a --trace-out run that records nothing (or could not be written)."""

from __future__ import annotations

import io

import pytest

from fmoe.serve import demo
from fmoe.serve.cli import build_parser, main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CACHE", str(tmp_path_factory.mktemp("fmoe-cache")))
        # a smaller model of the demo's kind: these tests are about the CLI, not the weights
        mp.setattr(demo, "DEMO_CONFIG", dict(demo.DEMO_CONFIG, hidden_size=32, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2))
        return demo.demo_checkpoint()


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- --debug -------------------------------------------------------------------------------------
COMMANDS = ["demo", "generate", "simulate", "serve", "chat", "convert", "synth", "bench", "calibrate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_takes_debug(capsys, command):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0 and "--debug" in capsys.readouterr().out


@pytest.mark.parametrize("argv, debug", [
    (["generate", "m", "--prompt", "x"], False),
    (["--debug", "generate", "m", "--prompt", "x"], True),      # the sub-command's default stays out
    (["generate", "m", "--prompt", "x", "--debug"], True),
    (["generate", "--debug", "m", "--prompt", "x"], True),
])
def test_debug_on_either_side(argv, debug):
    assert build_parser().parse_args(argv).debug is debug


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    argv = ["generate", str(tmp_path / "none"), "--prompt", "hi", "--top-p", "0"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ValueError, match="--top-p"):
        main(argv)


def test_without_debug_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "generate", tmp_path / "none", "--prompt", "hi", "--top-p", "0")
    assert rc == 1 and one_line(err).startswith("fmoe generate: error: --top-p")


# -- chat: a line that is not text is skipped, the session goes on -------------------------------
@pytest.mark.parametrize("stdin, what", [
    # bytes through a strict decoder, as a UTF-8 locale's stdin reads them
    (lambda: io.TextIOWrapper(io.BytesIO(b"hi \xff\nhello\n"), encoding="utf-8"), "byte 0xff"),
    # already decoded with surrogateescape (a C.UTF-8 locale's stdin)
    (lambda: io.StringIO("hi \udcff\nhello\n"), "byte 0xff"),
    (lambda: io.StringIO("hi \ud800\nhello\n"), r"'\ud800'"),
])
def test_chat_skips_a_line_that_is_not_text(capsys, monkeypatch, ckpt, stdin, what):
    monkeypatch.setattr("sys.stdin", stdin())
    rc, out, err = run(capsys, "chat", ckpt, "--max-new-tokens", "2")
    assert rc == 0
    line = one_line(err)
    assert line.startswith("fmoe chat: ") and "not valid text" in line and what in line
    assert out.count("\n") == 1        # one reply: to "hello", after the skipped line


# -- --trace-out ---------------------------------------------------------------------------------
def test_chat_that_records_nothing_writes_no_trace(capsys, monkeypatch, ckpt, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    trace = tmp_path / "t.npz"
    rc, _, err = run(capsys, "chat", ckpt, "--expert-cache", "0.25", "--trace-out", trace)
    assert rc == 0 and not trace.exists()
    assert str(trace) in one_line(err) and "error" not in err


def test_generate_of_no_tokens_writes_no_trace(capsys, ckpt, tmp_path):
    trace = tmp_path / "t.npz"
    rc, out, err = run(capsys, "generate", ckpt, "--prompt", "Hi", "--max-new-tokens", "0",
                       "--expert-cache", "0.25", "--trace-out", trace)
    assert rc == 0 and out == "Hi\n" and not trace.exists()
    assert str(trace) in one_line(err)


@pytest.mark.parametrize("name, needle", [("t.txt", "must end with .npz"),
                                          ("file/t.npz", "is not a directory")])
def test_an_unwritable_trace_out_is_one_line(capsys, ckpt, tmp_path, name, needle):
    (tmp_path / "file").write_text("x")
    trace = tmp_path / name
    rc, out, err = run(capsys, "generate", ckpt, "--prompt", "Hi", "--max-new-tokens", "2",
                       "--expert-cache", "0.25", "--trace-out", trace)
    line = one_line(err)
    assert rc == 1 and line.startswith("fmoe generate: error: ") and out == ""
    assert "--trace-out" in line and str(trace) in line and needle in line


# -- output --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 21])
def test_generate_prints_the_whole_text(capsys, ckpt, n):
    """What `fmoe generate` prints is the prompt and the decode of every token generated: a
    character still incomplete at the last token is flushed at the end, not dropped."""
    import torch

    import fmoe

    rc, out, _ = run(capsys, "generate", ckpt, "--prompt", "Hello", "--max-new-tokens", n)
    assert rc == 0
    m = fmoe.models.from_pretrained(ckpt)
    ids = m.tokenizer.encode("Hello")
    new = [t for t in m.generate(torch.tensor([ids]), n)[0, len(ids):].tolist()
           if t not in m.eos_token_ids]
    assert out == "Hello" + m.tokenizer.decode(new) + "\n"


@pytest.mark.parametrize("command", [["generate", "--prompt", "Hello", "--max-new-tokens", "50"],
                                     ["chat", "--max-new-tokens", "50"]])
def test_a_closed_stdout_ends_quietly(ckpt, command):
    """The reader of stdout gone (`| head`): exit 141 with nothing on stderr, as other tools."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)                     # closed before anything is written: every write fails
    try:
        p = subprocess.run([sys.executable, "-m", "fmoe.serve.cli", command[0], str(ckpt), *command[1:]],
                           stdout=w, stderr=subprocess.PIPE, input=b"hello\n", timeout=300)
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == b"", p.stderr.decode()


def test_ctrl_c_stops_a_chat_reply_not_the_session(capsys, monkeypatch, ckpt):
    from fmoe.runtime import text_stream

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Tty("hello\n"))
    rc, alone, _ = run(capsys, "chat", ckpt, "--max-new-tokens", "6")
    assert rc == 0

    class Interrupted(text_stream.TextStream):
        pushes = 0

        def push(self, token_id):
            Interrupted.pushes += 1
            if Interrupted.pushes == 2:         # Ctrl-C during the first reply
                raise KeyboardInterrupt
            return super().push(token_id)

    monkeypatch.setattr(text_stream, "TextStream", Interrupted)
    monkeypatch.setattr("sys.stdin", Tty("hello\nhello\n"))
    rc, out, err = run(capsys, "chat", ckpt, "--max-new-tokens", "6")
    assert rc == 0 and "reply interrupted" in err and Interrupted.pushes > 2
    # the turn was dropped: the second "hello" gets the reply a fresh session gives
    reply = alone.split("> ", 1)[1].rsplit("> ", 1)[0]
    assert reply.strip() and out.rsplit("> ", 1)[0].endswith(reply)


def test_chat_drops_the_oldest_exchanges_to_fit_the_context(capsys, monkeypatch, ckpt):
    """A conversation longer than the context goes on: the oldest exchanges are dropped (the
    system message stays), as llama.cpp shifts its context; a message too long by itself is
    refused and the session goes on."""
    import json

    ctx = json.loads((ckpt / "config.json").read_text())["max_position_embeddings"]
    long = "word " * (ctx // 12)                       # a few turns fill the context
    turns = [f"{i} {long}" for i in range(8)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns + ["x " * ctx, "hi"]) + "\n"))
    rc, out, err = run(capsys, "chat", ckpt, "--system", "be brief", "--max-new-tokens", "3")
    assert rc == 0
    assert "oldest exchange(s) to fit the context" in err and "by itself" in err
    assert out.count("\n") == len(turns) + 1           # every turn but the too-long one replied
