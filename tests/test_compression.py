"""Compressor encodings, spec checks and config-time rejections, in one process."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hpcdl.compression import build_compressor, parse_compression
from hpcdl.compression.base import pack, unpack
from hpcdl.compression.compat import check_compression
from hpcdl.compression.qsgd import level_dtype
from hpcdl.compression.signsgd import pack_bits, unpack_bits
from hpcdl.errors import ConfigError
from hpcdl.specs import Spec
from tests.conftest import run_cli


def test_pack_bits_round_trip():
    bits = torch.rand(77, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == 10
    assert torch.equal(unpack_bits(packed, 77), bits)


def test_pack_and_unpack_mixed_dtypes():
    tensors = [torch.tensor([1.5]), torch.tensor([-3, 4], dtype=torch.int8), torch.tensor([7], dtype=torch.int32)]
    buffer = pack(tensors)
    assert buffer.numel() == 4 + 2 + 4
    out = unpack(buffer, [(torch.float32, 1), (torch.int8, 2), (torch.int32, 1)])
    for got, want in zip(out, tensors):
        assert torch.equal(got, want)


@pytest.mark.parametrize("levels, dtype", [(1, torch.int8), (127, torch.int8), (128, torch.int16),
                                           (32767, torch.int16), (32768, torch.int32)])
def test_qsgd_level_dtype_is_smallest(levels, dtype):
    assert level_dtype(levels) == dtype


def test_qsgd_levels_stay_in_range():
    compressor = build_compressor("qsgd:levels=3")
    flat = torch.randn(500, generator=torch.Generator().manual_seed(1))
    norm, levels = compressor.encode("t", flat)
    assert levels.dtype == torch.int8
    assert int(levels.abs().max()) <= 3
    assert norm.item() == pytest.approx(float(flat.norm()), rel=1e-6)


def test_topk_keeps_largest_magnitudes():
    compressor = build_compressor("topk:ratio=0.3,ef=false")
    flat = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 1.0, 0.05, -2.0, 0.4])
    decoded = compressor.decode("t", compressor.encode("t", flat), 10)
    assert torch.equal(decoded, torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, -2.0, 0.0]))


def test_signsgd_decodes_scaled_signs():
    compressor = build_compressor("signsgd:ef=false")
    flat = torch.tensor([1.0, -3.0, 0.0, 2.0])
    decoded = compressor.decode("t", compressor.encode("t", flat), 4)
    assert torch.equal(decoded, torch.tensor([1.5, -1.5, 1.5, 1.5]))


def test_default_error_feedback_per_compressor():
    with_feedback = ["fp16", "bf16", "topk:ratio=0.1", "randk:ratio=0.1", "signsgd", "powersgd:rank=1"]
    without = ["none", "qsgd:levels=2", "randk:ratio=0.1,unbiased=true", "topk:ratio=0.1,ef=false"]
    for spec in with_feedback:
        assert build_compressor(spec).feedback is not None, spec
    for spec in without:
        assert build_compressor(spec).feedback is None, spec


@pytest.mark.parametrize("spec, message", [
    ("topk", "needs ratio"),
    ("topk:ratio=0", "must be > 0"),
    ("randk:ratio=1.5", "must be <= 1"),
    ("qsgd:levels=0", "must be >= 1"),
    ("powersgd:rank=two", "expected an integer"),
    ("signsgd:ef=maybe", "expected true or false"),
    ("topk:ration=0.1", "Did you mean 'ratio'"),
])
def test_invalid_specs_rejected(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_compression(spec)


def test_hogwild_rejects_compression():
    with pytest.raises(ConfigError, match="no message to compress"):
        check_compression(Spec("hogwild", {}), Spec("topk", {"ratio": 0.1}))


@pytest.mark.parametrize("strategy", ["async", "ssp", "bsp-ps"])
def test_push_strategies_accept_every_compressor(strategy):
    for spec in ("fp16", "bf16", "topk:ratio=0.1", "randk:ratio=0.1", "qsgd:levels=4", "signsgd",
                 "powersgd:rank=2"):
        check_compression(Spec(strategy, {}), parse_compression(spec))


def test_unknown_route_rejects_compression():
    with pytest.raises(ConfigError, match="does not send its updates through a compressor"):
        check_compression(Spec("pipeline", {}), Spec("fp16", {}))


def test_summing_strategies_accept_every_compressor():
    for strategy in ("allreduce", "local-sgd", "hierarchical", "diloco"):
        check_compression(Spec(strategy, {}), Spec("powersgd", {"rank": 2}))


def test_checkpoint_without_state_warns(caplog):
    compressor = build_compressor("topk:ratio=0.1")
    with caplog.at_level(logging.WARNING, logger="hpcdl.compression.base"):
        compressor.load_state_dict({})
    assert "no state for compression 'topk'" in caplog.text


def test_state_dict_round_trip_restores_residuals():
    compressor = build_compressor("powersgd:rank=1")
    shapes = [torch.Size([4, 5])]
    compressor.encode("t", torch.randn(20), shapes=shapes)
    state = compressor.state_dict()
    restored = build_compressor("powersgd:rank=1")
    restored.load_state_dict(state)
    assert torch.equal(restored.feedback.residuals["t/0"], compressor.feedback.residuals["t/0"])
    assert torch.equal(restored.q_factors["t/0"], compressor.q_factors["t/0"])


def test_cli_rejects_invalid_ratio_before_start(tmp_path):
    result = run_cli(["hpcdl", "train", "-n", "2", "--compression", "topk:ratio=2", "--run-dir",
                      str(tmp_path / "run")], timeout=120)
    assert result.returncode == 2
    assert "ratio" in result.stderr
    assert "Traceback" not in result.stderr


# Counts the bytes sent on the loopback interface of a fresh network namespace
# around one command, so traffic of other processes on the machine is not counted.
_NETNS_SCRIPT = """
set -e
ip link set lo up
tx() { awk '/ lo:/ || /^lo:/ {print $10}' /proc/net/dev; }
before=$(tx)
"$@"
after=$(tx)
echo "lo_tx_bytes $((after - before))"
"""

# MPICH settings that send every message over TCP sockets instead of shared memory.
_TCP_ENV = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}


def test_comm_bytes_match_tcp_loopback_counters(tmp_path):
    probe = run_cli(["unshare", "-rn", "true"], timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace with 'unshare -rn': {probe.stderr.strip()}")
    run_dir = tmp_path / "run"
    result = run_cli(["unshare", "-rn", "bash", "-c", _NETNS_SCRIPT, "netns",
                      "hpcdl", "train", "-n", "2", "--dataset", "digits", "--model", "mlp", "--hidden", "256",
                      "--steps", "20", "--compression", "topk:ratio=0.05", "--progress", "off",
                      "--run-dir", str(run_dir)],
                     env=_TCP_ENV, timeout=240)
    assert result.returncode == 0, result.stderr
    kernel_bytes = int(result.stdout.split("lo_tx_bytes")[-1].split()[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["comm_bytes"] > 0
    assert abs(kernel_bytes - summary["comm_bytes"]) <= 0.10 * kernel_bytes, (kernel_bytes, summary["comm_bytes"])
