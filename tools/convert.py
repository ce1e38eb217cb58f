"""Convert an HF checkpoint into fmoe's expert-major store (see docs/store-format.md).

    python tools/convert.py SRC DST [--dtype bfloat16|float16|float32] [--force] [--verify]

SRC is a local checkpoint directory or a hub repo id; DST loads with
``fmoe.models.from_pretrained(DST)``. The same as ``fmoe convert``; this wrapper runs from a
checkout without installing the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmoe.models.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
