"""llama.cpp, the peer CPU users pick, built from source and fed the same weights as fmoe.

    python tools/llama_cpp.py build --dir /work/llama            # sdist -> llama-bench (minutes)
    python tools/llama_cpp.py convert MODEL OUT.gguf --dir /work/llama
    python tools/bench_memlimit.py ... --gguf OUT.gguf --llama-bench /work/llama/.../llama-bench

`build`: the llama.cpp source vendored in PyPI's ``llama-cpp-python`` sdist (``pip download
--no-deps --no-binary :all:``; the sdist's CHANGELOG names the llama.cpp commit), its dangling
``.git`` gitlink removed (ninja otherwise loops on "build.ninja still dirty"), cmake with
``-DGGML_NATIVE=ON -DLLAMA_CURL=OFF``, targets llama-bench and llama-completion. Needs cmake,
a C++ compiler and ninja (``apt-get install cmake build-essential ninja-build``).

`convert`: llama.cpp's own ``convert_hf_to_gguf.py`` at ``--outtype bf16`` (the same bf16 bytes
fmoe reads), with two settings a random-weight checkpoint needs:

- its tokenizer is not one of the published ones llama.cpp recognises by hash, so the converter
  is told the pre-tokenizer ("default"); llama-bench feeds token ids, never text, so this does
  not touch what is measured;
- llama.cpp recognises DeepSeek-V2-Lite (no q-LoRA) by its layer count (27), so a model with
  fewer layers gets ``q_lora_rank = 0`` written into the GGUF.

Mixtral's conversion (a Llama vocabulary) also needs ``pip install sentencepiece``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

WRAPPER = r'''
import runpy, sys
from pathlib import Path
src = Path(sys.argv[1])
sys.path[:0] = [str(src), str(src / "gguf-py")]
import conversion.base as base
from conversion.deepseek import DeepseekV2Model

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
_params = DeepseekV2Model.set_gguf_parameters

def set_gguf_parameters(self):
    _params(self)
    if self.hparams.get("q_lora_rank") is None and self.block_count != 27:
        self.gguf_writer.add_q_lora_rank(0)

DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
sys.argv = [str(src / "convert_hf_to_gguf.py")] + sys.argv[2:]
runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")
'''


def source_dir(root: Path) -> Path:
    found = sorted(glob.glob(str(root / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    if not found:
        raise SystemExit(f"{root}: no llama.cpp source; run `python tools/llama_cpp.py build --dir {root}`")
    return Path(found[-1])


def build(root: Path, jobs: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not glob.glob(str(root / "llama_cpp_python-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", str(root)], check=True)
    sdist = sorted(glob.glob(str(root / "llama_cpp_python-*.tar.gz")))[-1]
    if not glob.glob(str(root / "llama_cpp_python-*" / "vendor" / "llama.cpp")):
        with tarfile.open(sdist) as tf:
            tf.extractall(root, filter="data")
    src = source_dir(root)
    git = src / ".git"
    if git.is_file():
        git.unlink()
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install cmake build-essential ninja-build")
    subprocess.run(["cmake", "-B", "build", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF"], cwd=src, check=True)
    subprocess.run(["cmake", "--build", "build", f"-j{jobs}", "--target", "llama-bench", "llama-completion"],
                   cwd=src, check=True)
    bench = src / "build" / "bin" / "llama-bench"
    print(f"llama-bench: {bench}")
    changelog = next(iter(glob.glob(str(src.parents[1] / "CHANGELOG.md"))), None)
    if changelog:
        for line in Path(changelog).read_text().splitlines():
            if "llama.cpp@" in line:
                print(f"llama.cpp commit: {line.split('llama.cpp@')[1].split()[0]}")
                break
    return bench


# model types whose conversion reads a Llama-style vocabulary through sentencepiece
SENTENCEPIECE_TYPES = ("llama", "mistral", "mixtral")


def convert(root: Path, model: Path, out: Path) -> None:
    model_type = json.loads((model / "config.json").read_text()).get("model_type")
    if model_type in SENTENCEPIECE_TYPES and importlib.util.find_spec("sentencepiece") is None:
        raise SystemExit(f"converting a {model_type} checkpoint needs sentencepiece, which llama.cpp's "
                         f"converter imports: pip install sentencepiece")
    src = source_dir(root)
    tmp = out.with_name(out.name + ".partial")
    env = dict(os.environ, NO_LOCAL_GGUF="")
    subprocess.run([sys.executable, "-c", WRAPPER, str(src), str(model), "--outtype", "bf16",
                    "--outfile", str(tmp)], check=True, env=env)
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.1f} GiB)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    c = sub.add_parser("convert")
    c.add_argument("model", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--dir", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args.dir, args.jobs)
    else:
        convert(args.dir, args.model, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
