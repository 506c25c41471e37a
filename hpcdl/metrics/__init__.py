"""Run outputs: metrics.jsonl, summary.json and progress display."""

from hpcdl.metrics.progress import Progress
from hpcdl.metrics.writer import MetricsWriter, SUMMARY_KEYS, write_summary

__all__ = ["MetricsWriter", "Progress", "SUMMARY_KEYS", "write_summary"]
