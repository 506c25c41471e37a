"""Run every benchmark harness and assemble BENCHMARKS.md (the ``make bench`` target).

Steps, in order:
1. ``hpcdl bench allreduce`` on 4 ranks (ring, mpi, hierarchical, and horovod where
   it imports), 4 B to 64 MB -> ``bench/results/busbw.md``;
2. ``hpcdl bench project`` fitted on step 1 -> ``bench/results/projection.md``;
3. ``hpcdl bench scaling`` weak, 1, 2 and 4 ranks -> ``bench/results/scaling.md``;
4. ``bench/headline.py`` (needs root for the emulated links) -> ``bench/results/headline.md``;
5. every other ``bench/*.py`` harness with its default arguments, each writing its own
   ``bench/results/<name>.md``.

A harness that fails is reported in BENCHMARKS.md and the next one runs. Then
BENCHMARKS.md is written from the machine description and every fragment in
``bench/results/``. ``bench/results/targets.md``, the summary of every target
against its latest figure, is written by hand and kept first.

Usage:
    .venv/bin/python bench/run_all.py [--assemble-only] [--only NAME,...] [--quick]

``--quick`` runs steps 1 to 4 on tiny settings to check the harnesses; its
figures mean nothing and it skips step 5.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
HPCDL = str(BIN / "hpcdl")
# Run by run_all itself, or helpers of another harness rather than harnesses.
OWN_HARNESSES = {"run_all", "headline", "ddp_baseline"}
ORDER = ["targets", "headline", "busbw", "projection", "scaling", "allreduce", "local_sgd", "compression", "ps",
         "pipeline", "horovod"]


def _run(name: str, command: list[str], failures: dict[str, str]) -> None:
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, text=True, stdout=sys.stdout, stderr=subprocess.PIPE)
    print(f"== {name}: exit status {result.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
    if result.returncode != 0:
        failures[name] = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no error output"
        print(result.stderr[-2000:], file=sys.stderr)


def _has_horovod() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True)
    return probe.returncode == 0


def _own_steps(quick: bool) -> list[tuple[str, list[str]]]:
    out = RESULTS / "raw"
    algorithms = "ring,mpi,hierarchical" + (",horovod" if _has_horovod() else "")
    sizes = "64KB:4MB" if quick else "4B:64MB"
    ranks = "2" if quick else "4"
    train = ["--dataset", "digits", "--model", "mlp", "--epochs", "1"] if quick else \
        ["--dataset", "mnist5k", "--model", "mlp", "--hidden", "1024", "--epochs", "2"]
    return [
        ("busbw", [HPCDL, "bench", "allreduce", "-n", ranks, "--algorithms", algorithms, "--sizes", sizes,
                   "--out", str(out / "busbw")]),
        ("projection", [HPCDL, "bench", "project", "--csv", str(out / "busbw" / "allreduce.csv"),
                        "--link", "200gbit", "--latency", "1us", "-n", "64"]),
        ("scaling", [HPCDL, "bench", "scaling", "-n", "1,2" if quick else "1,2,4", "--weak",
                     "--out", str(out / "scaling"), *train]),
        ("headline", [sys.executable, "bench/headline.py", *(["--quick"] if quick else [])]),
    ]


def _collect_own(name: str) -> None:
    raw = RESULTS / "raw"
    if name == "busbw" and (raw / "busbw" / "allreduce.md").is_file():
        (RESULTS / "busbw.md").write_text("# All-reduce bus bandwidth\n\n`hpcdl bench allreduce`; bus bandwidth "
                                          "= algbw x 2(N-1)/N; last column: ratio to MPI_Allreduce.\n\n"
                                          + (raw / "busbw" / "allreduce.md").read_text())
    if name == "scaling" and (raw / "scaling" / "scaling.md").is_file():
        (RESULTS / "scaling.md").write_text("# Weak scaling of training throughput\n\n`hpcdl bench scaling "
                                            "--weak`.\n\n" + (raw / "scaling" / "scaling.md").read_text())


def _run_projection(command: list[str], failures: dict[str, str]) -> None:
    print(f"== projection: {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        failures["projection"] = result.stderr.strip()[-500:]
        return
    print(result.stdout)
    (RESULTS / "projection.md").write_text("# Projection to a larger cluster\n\n`" + " ".join(command[1:])
                                           + "`\n\n```\n" + result.stdout.strip() + "\n```\n")


def machine_description() -> list[str]:
    """Return Markdown lines that describe this machine and software."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kb = int(meminfo.read_text().split()[1])
        memory = f", {total_kb / (1 << 20):.0f} GiB memory"
    versions = subprocess.run([sys.executable, "-c", "import torch, mpi4py.MPI as M; "
                               "print(torch.__version__, '|', M.Get_library_version().splitlines()[0])"],
                              capture_output=True, text=True).stdout.strip()
    return [f"- Machine: {cpu}, {os.cpu_count()} logical CPUs{memory}; {platform.system()} {platform.release()}.",
            f"- Software: Python {platform.python_version()}, torch and MPI: {versions or 'unknown'}.",
            f"- Generated: {time.strftime('%Y-%m-%d %H:%M %Z')} by `make bench` (`bench/run_all.py`)."]


def _demote(text: str) -> str:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(lines)


def assemble(failures: dict[str, str]) -> Path:
    """Write BENCHMARKS.md from the machine description and every fragment in bench/results."""
    fragments = sorted(RESULTS.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else
                                                            len(ORDER), p.stem))
    parts = ["# Benchmarks", "",
             "Regenerated by `make bench`. Figures depend on this machine and its load; the harness and "
             "command behind each table are named with it.", "", *machine_description(), ""]
    if failures:
        parts += ["## Harnesses that failed", ""] + [f"- `{name}`: {reason}" for name, reason in failures.items()]
        parts.append("")
    for fragment in fragments:
        parts += [_demote(fragment.read_text().strip()), ""]
    path = ROOT / "BENCHMARKS.md"
    path.write_text("\n".join(parts))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Run every benchmark and write BENCHMARKS.md.")
    parser.add_argument("--assemble-only", action="store_true", help="only rebuild BENCHMARKS.md")
    parser.add_argument("--only", help="comma list of harness names to run, e.g. busbw,headline")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the harnesses")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    failures: dict[str, str] = {}

    if not args.assemble_only:
        for name, command in _own_steps(args.quick):
            if only and name not in only:
                continue
            if name == "projection":
                _run_projection(command, failures)
                continue
            _run(name, command, failures)
            _collect_own(name)
        if not args.quick:
            for script in sorted((ROOT / "bench").glob("*.py")):
                if script.stem in OWN_HARNESSES or (only and script.stem not in only):
                    continue
                _run(script.stem, [sys.executable, str(script.relative_to(ROOT))], failures)

    path = assemble(failures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
