"""Convert an HF checkpoint into fmoe's expert-major store (see docs/store-format.md).

    python tools/convert.py SRC DST [--dtype bfloat16|float16|float32] [--force] [--verify]

SRC is a local checkpoint directory or a hub repo id; DST loads with
``fmoe.models.from_pretrained(DST)``. An FP8 block-scaled checkpoint (DeepSeek-V3/R1, Qwen3 -FP8)
stays FP8, scales included, unless ``--dtype`` asks for another dtype. The same as
``fmoe convert``, through the installed package (``make install`` or ``pip install -e .``).
"""

from __future__ import annotations

import sys

from fmoe.models.convert import main

if __name__ == "__main__":
    sys.exit(main())
