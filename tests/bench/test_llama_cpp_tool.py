"""tools/llama_cpp.py's checks that run before any llama.cpp source is needed."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool():
    spec = importlib.util.spec_from_file_location("llama_cpp_tool", TOOLS / "llama_cpp.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_convert_names_the_missing_sentencepiece_for_a_llama_vocabulary(tmp_path, monkeypatch):
    tool = _tool()
    model = tmp_path / "mixtral"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    real = importlib.util.find_spec
    monkeypatch.setattr(tool.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    with pytest.raises(SystemExit, match="pip install sentencepiece"):
        tool.convert(tmp_path / "no-llama", model, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    # other families do not need it: they get as far as looking for the llama.cpp source
    (model / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    with pytest.raises((SystemExit, FileNotFoundError, RuntimeError)) as err:
        tool.convert(tmp_path / "no-llama", model, tmp_path / "out.gguf")
    assert "sentencepiece" not in str(err.value)
