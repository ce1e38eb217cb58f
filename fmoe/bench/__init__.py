"""Benchmark facilities: real-shape random checkpoints (`fmoe synth`), routing replay, the
batch-1 live benchmark (`fmoe bench`) and this machine's profile (`fmoe calibrate`)."""
