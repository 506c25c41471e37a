"""Benchmark commands: bus bandwidth arithmetic, output files, compare reports, cost model, link emulation."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import HPCDL, run_cli

from hpcdl.bench import costmodel
from hpcdl.bench.allreduce import bus_bandwidth, parse_sizes
from hpcdl.bench.compare import parse_variants
from hpcdl.bench.emulate import EmulatedLinks, interface_bytes, leftovers, mpi_environment, parse_rate
from hpcdl.config import parse_straggler
from hpcdl.errors import ConfigError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def test_bus_bandwidth_arithmetic():
    algbw, busbw = bus_bandwidth(1_000_000_000, 2.0, 4)
    assert algbw == pytest.approx(0.5)
    assert busbw == pytest.approx(0.5 * 2 * 3 / 4)
    _, busbw_two = bus_bandwidth(1_000_000_000, 1.0, 2)
    assert busbw_two == pytest.approx(1.0)


def test_parse_sizes_range_and_list():
    assert parse_sizes("4B:256B") == [4, 16, 64, 256]
    assert parse_sizes("1MB,16MB") == [1 << 20, 16 << 20]
    with pytest.raises(ValueError):
        parse_sizes("1MB:4B")


def test_parse_rate_and_straggler():
    assert parse_rate("100mbit") == 100e6
    assert parse_rate("1gbit") == 1e9
    with pytest.raises(ConfigError, match="Invalid link rate"):
        parse_rate("fast")
    assert parse_straggler("1:4") == (1, 4.0)
    with pytest.raises(ConfigError, match="FACTOR >= 1"):
        parse_straggler("1:0.5")


def test_compare_variants_cross_product():
    variants = parse_variants("allreduce; local-sgd:period=4", "none; fp16")
    assert variants == [("allreduce", "none"), ("allreduce", "fp16"),
                        ("local-sgd:period=4", "none"), ("local-sgd:period=4", "fp16")]
    with pytest.raises(ConfigError):
        parse_variants("no-such-strategy", None)


def test_costmodel_fit_recovers_alpha_beta():
    alpha, beta, ranks = 5e-6, 1e-9, 4
    rows = [{"algorithm": "ring", "size_bytes": size, "ranks": ranks,
             "time_us": (2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * size * beta) * 1e6}
            for size in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    model = costmodel.fit(rows, "ring")
    assert model.alpha_s == pytest.approx(alpha, rel=1e-6)
    assert model.beta_s_per_byte == pytest.approx(beta, rel=1e-6)
    projection = costmodel.project(model, ["allreduce", "local-sgd:period=4"], 1 << 20, 4, 0.0)
    assert projection[1]["comm_ms"] == pytest.approx(projection[0]["comm_ms"] / 4)


def test_bench_allreduce_writes_csv_plot_and_projection(tmp_path):
    out = tmp_path / "allreduce"
    result = run_cli([HPCDL, "bench", "allreduce", "-n", "2", "--algorithms", "ring,mpi",
                      "--sizes", "4KB:64KB", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert "busbw_GB/s" in result.stdout
    assert (out / "allreduce.png").stat().st_size > 1000
    assert "vs mpi" in (out / "allreduce.md").read_text()
    with (out / "allreduce.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["algorithm"] for r in rows} == {"ring", "mpi"}
    assert [int(r["size_bytes"]) for r in rows] == [4096, 4096, 16384, 16384, 65536, 65536]
    for row in rows:
        algbw, busbw = bus_bandwidth(int(row["size_bytes"]), float(row["time_us"]) * 1e-6, 2)
        assert float(row["busbw_gbps"]) == pytest.approx(busbw, rel=1e-6)

    projected = run_cli([HPCDL, "bench", "project", "--csv", str(out / "allreduce.csv"), "--link", "200gbit",
                         "--latency", "1us", "-n", "64"])
    assert projected.returncode == 0, projected.stderr
    assert "Projection (alpha-beta model, not a measurement)" in projected.stdout
    assert "| async |" in projected.stdout


def test_compare_report_lists_every_variant(tmp_path):
    out = tmp_path / "compare"
    result = run_cli([HPCDL, "compare", "-n", "2", "--dataset", "digits", "--epochs", "1", "--hidden", "32",
                      "--strategies", "allreduce; local-sgd:period=4", "--straggler", "1:2", "--out", str(out)],
                     timeout=600)
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    assert "| allreduce |" in report
    assert "| local-sgd:period=4 |" in report
    for plot in ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "loss_vs_step.png"):
        assert (out / plot).stat().st_size > 1000
    allreduce_row = next(line for line in report.splitlines() if line.startswith("| allreduce |"))
    assert allreduce_row.split("|")[7].strip() == "1.0000"  # comm_bytes ratio to itself


def test_emulate_link_without_root_fails_first(tmp_path):
    command = [HPCDL, "bench", "allreduce", "-n", "2", "--emulate-link", "100mbit", "--out", str(tmp_path / "out")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = run_cli(command, cwd=tmp_path)
    assert result.returncode == 2
    assert "needs root" in result.stderr
    assert not (tmp_path / "out").exists()


_TRANSFER = """
import time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
buffer = np.ones(5_000_000, dtype=np.float32)
comm.Allreduce(MPI.IN_PLACE, buffer)
times = []
for _ in range(3):
    comm.Barrier()
    start = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, buffer)
    times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
if comm.rank == 0:
    print("elapsed_s", min(times), flush=True)
"""


@needs_root
def test_emulated_link_rate_and_cleanup(tmp_path):
    script = tmp_path / "transfer.py"
    script.write_text(_TRANSFER)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    with EmulatedLinks(2, "100mbit") as links:
        # Two namespaces, two host-side veths and the bridge.
        assert len(leftovers(links.tag)) == 5
        before = interface_bytes(links.veth(0))[0]
        env = dict(os.environ, **mpi_environment())
        result = subprocess.run(links.mpiexec_command(mpiexec, 2, [sys.executable, str(script)]),
                                capture_output=True, text=True, env=env, timeout=180)
        sent = interface_bytes(links.veth(0))[0] - before
        tag = links.tag
    assert result.returncode == 0, result.stderr
    elapsed = float(result.stdout.split("elapsed_s")[1].split()[0])

    # Four all-reduces of 20 MB on 2 ranks: each rank sends at least 20 MB per call through its veth.
    assert sent >= 4 * 20e6
    # Bits the kernel counted per call, over the fastest timed call (as bandwidth
    # benchmarks report it): the link runs near 100 Mbit/s.
    rate_bits = sent / 4 * 8 / elapsed
    assert rate_bits == pytest.approx(100e6, rel=0.2)
    assert leftovers(tag) == []


@needs_root
def test_emulated_links_removed_after_error():
    with pytest.raises(RuntimeError, match="inside"):
        with EmulatedLinks(2, "1gbit") as links:
            tag = links.tag
            raise RuntimeError("error inside the emulation")
    assert leftovers(tag) == []


@needs_root
def test_emulated_links_removed_on_sigterm(tmp_path):
    code = ("import sys, time\nfrom hpcdl.bench.emulate import EmulatedLinks\n"
            "with EmulatedLinks(2, '1gbit', tag='sigt') as links:\n"
            "    print('ready', flush=True)\n    time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    assert leftovers("sigt-")
    process.terminate()
    process.wait(timeout=30)
    time.sleep(0.1)
    assert leftovers("sigt") == []


@needs_root
def test_project_reproduces_emulated_measurements(tmp_path):
    # Behind a 100 Mbit link the all-reduce time is bandwidth-bound, so the fit is stable on a loaded host.
    out = tmp_path / "emulated"
    result = run_cli([HPCDL, "bench", "allreduce", "-n", "2", "--algorithms", "mpi", "--sizes", "256KB:4MB",
                      "--emulate-link", "100mbit", "--out", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr
    assert leftovers() == []

    measurements = costmodel.read_measurements(out / "allreduce.csv")
    model = costmodel.fit(measurements, "mpi")
    for size, measured, modelled in costmodel.fit_errors(model, measurements):
        assert modelled == pytest.approx(measured, rel=0.2), size
    # The fitted bandwidth is that of the link: 100 Mbit/s is 0.0125 GB/s.
    assert model.bandwidth_gbps == pytest.approx(0.0125, rel=0.25)


def test_straggler_rank_out_of_range():
    result = run_cli([HPCDL, "train", "-n", "2", "--straggler", "5:2", "--steps", "1"])
    assert result.returncode == 2
    assert "rank 5 does not exist" in result.stderr


def test_bench_scaling_writes_outputs(tmp_path):
    out = tmp_path / "scaling"
    result = run_cli([HPCDL, "bench", "scaling", "-n", "1,2", "--strong", "--batch-size", "32", "--dataset",
                      "digits", "--hidden", "16", "--steps", "5", "--out", str(out)], timeout=600)
    assert result.returncode == 0, result.stderr
    with (out / "scaling.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["ranks"]) for r in rows] == [1, 2]
    assert [int(r["per_rank_batch"]) for r in rows] == [32, 16]
    assert float(rows[0]["efficiency"]) == pytest.approx(1.0)
    assert float(rows[1]["efficiency"]) == pytest.approx(float(rows[1]["speedup"]) / 2)
    assert (out / "scaling.png").stat().st_size > 1000
    assert "| ranks (strong) |" in (out / "scaling.md").read_text()
