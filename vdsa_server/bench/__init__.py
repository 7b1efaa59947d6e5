"""Benchmarks: vdsa's figures next to a reference measured in the same run on the same machine."""
