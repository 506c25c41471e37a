"""Benchmark harness code shared by ``bench/`` scripts and ``hpcdl bench``."""
