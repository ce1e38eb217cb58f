"""`fmoe synth`, `fmoe bench` and `fmoe calibrate`."""

from __future__ import annotations


def register(sub) -> None:
    pass
