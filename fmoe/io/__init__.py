"""Checkpoint and store I/O: the safetensors header index and `FileReader` (``preadv``,
O_DIRECT), FP8 block scales, expert layouts, fmoe's expert-store format and its writer.

Pure file and tensor code: it imports nothing from `fmoe.models`, `fmoe.runtime`, `fmoe.serve`
or `fmoe.sim`, so every one of them can use it.
"""
