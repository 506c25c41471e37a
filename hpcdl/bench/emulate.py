"""Rate-limited links between local ranks: one network namespace per rank.

``EmulatedLinks(ranks, "100mbit")`` creates, for each rank i, a namespace
``hpcdl-TAG-i`` whose only interface besides ``lo`` is ``eth0`` (address
10.99.0.(i+1)/24), the far end of a veth pair plugged into the bridge
``hpbTAG``. A ``tbf`` qdisc limits both directions of each veth to the rate, so
every rank has a full-duplex link of that rate, like one NIC per node.

``mpiexec`` starts each rank through ``python -m hpcdl.bench.emulate TAG --
COMMAND``, which enters the namespace of its ``PMI_RANK`` and execs COMMAND
there. The MPI environment set by :func:`mpi_environment` disables MPICH's
shared-memory path and pins its network module to ``eth0``, so all MPI traffic
crosses the limited links. Hydra talks to its ranks over an inherited socket,
which works across namespaces.

Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); without it
:func:`check_privileges` raises ConfigError before anything starts. Namespaces,
veths and the bridge are removed on exit, on error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from hpcdl.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "hpcdl-"
BRIDGE_PREFIX = "hpb"
VETH_PREFIX = "hpv"
SUBNET = "10.99.0"
MAX_RANKS = 250

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)\s*$", re.IGNORECASE)
_RATE_SCALE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def parse_rate(text: str) -> float:
    """Parse a tc-style rate such as ``100mbit`` or ``1gbit`` into bits per second."""
    match = _RATE.match(text or "")
    if not match:
        raise ConfigError(f"Invalid link rate {text!r}: expected a number and a unit of bit, kbit, mbit, "
                          f"gbit or tbit, for example 100mbit or 1gbit.")
    bits = float(match.group(1)) * _RATE_SCALE[match.group(2).lower()]
    if bits < 1e5:
        raise ConfigError(f"Invalid link rate {text!r}: the emulated link needs at least 100kbit.")
    return bits


def check_privileges() -> None:
    """Raise ConfigError unless this process can create network namespaces."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"--emulate-link needs the iproute2 tools, but {', '.join(missing)} was not found "
                          f"on PATH. Install iproute2.")
    if os.geteuid() != 0:
        raise ConfigError("--emulate-link creates network namespaces, veth links and tbf qdiscs, which needs "
                          "root. Run the command as root (for example with sudo), or leave out --emulate-link.")


def mpi_environment(interface: str = "eth0", ranks: int | None = None) -> dict[str, str]:
    """Return the variables that force MPICH's traffic through ``interface``.

    ``MPIR_CVAR_NOLOCAL=1`` turns off the shared-memory path between ranks on
    one host. The OFI tcp provider and UCX's tcp transport are both pinned to
    the interface, so the choice of MPICH network module does not matter.

    With ``NOLOCAL``, MPI's shared-memory split puts each rank in a node of its
    own, so ``hpcdl.init`` would give each rank all the host's cores for
    torch's threads. With ``ranks``, ``OMP_NUM_THREADS`` shares the cores out
    instead, unless it is set already, because the emulated hosts still share
    one CPU.
    """
    env = {
        "MPIR_CVAR_NOLOCAL": "1",
        "MPIR_CVAR_CH4_NETMOD": "ofi",
        "FI_PROVIDER": "tcp",
        "FI_TCP_IFACE": interface,
        "UCX_TLS": "tcp",
        "UCX_NET_DEVICES": interface,
    }
    if ranks is not None and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // ranks))
    return env


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with exit status {result.returncode}: "
                           f"{result.stderr.strip()}")
    return result


def namespace_name(tag: str, rank: int) -> str:
    """Return the name of the namespace of ``rank`` in the emulation ``tag``."""
    return f"{PREFIX}{tag}-{rank}"


def leftovers(tag: str = "") -> list[str]:
    """Return namespaces and links of emulation ``tag`` (every emulation when empty) that still exist."""
    found = []
    namespaces = _run("ip", "netns", "list", check=False).stdout.split("\n")
    found += [line.split()[0] for line in namespaces if line.startswith(f"{PREFIX}{tag}")]
    links = _run("ip", "-o", "link", "show", check=False).stdout.split("\n")
    for line in links:
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        if name.startswith((f"{BRIDGE_PREFIX}{tag}", f"{VETH_PREFIX}{tag}")):
            found.append(name)
    return found


def interface_bytes(name: str) -> tuple[int, int]:
    """Return (rx_bytes, tx_bytes) of a host-side interface from the kernel counters."""
    stats = Path("/sys/class/net") / name / "statistics"
    return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())


def _tbf(rate_bits: float, device: str, namespace: str | None = None) -> list[str]:
    # The bucket must hold at least one timer tick of traffic (rate / HZ, HZ >= 100)
    # and a full 64 KiB segment, or tbf stalls on large packets.
    burst = max(64 * 1024 + 1600, int(rate_bits / 8 / 100))
    prefix = ["tc", "-n", namespace] if namespace else ["tc"]
    return [*prefix, "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{int(rate_bits)}bit",
            "burst", str(burst), "latency", "100ms"]


class EmulatedLinks:
    """One namespace per rank behind rate-limited veth links; a context manager.

    Args:
        ranks: number of ranks, 1 to 250.
        rate: link rate, e.g. ``"100mbit"``.
        tag: name part shared by this emulation's namespaces and links (default from the PID).

    Example:
        >>> with EmulatedLinks(2, "100mbit") as links:
        ...     subprocess.run(links.mpiexec_command(mpiexec, 2, ["python", "job.py"]))
    """

    def __init__(self, ranks: int, rate: str, tag: str | None = None) -> None:
        if not 1 <= ranks <= MAX_RANKS:
            raise ConfigError(f"Invalid rank count {ranks} for --emulate-link: use 1 to {MAX_RANKS} ranks.")
        self.ranks = ranks
        self.rate = rate
        self.rate_bits = parse_rate(rate)
        self.tag = tag or _base36(os.getpid())[-6:]
        self.bridge = f"{BRIDGE_PREFIX}{self.tag}"
        self._previous_handlers: dict[int, object] = {}

    def veth(self, rank: int) -> str:
        """Return the host-side veth name of ``rank``; its rx counter is what the rank sent."""
        return f"{VETH_PREFIX}{self.tag}-{rank}"

    def __enter__(self) -> EmulatedLinks:
        check_privileges()
        self._install_signal_handlers()
        try:
            self.create()
        except BaseException:
            self.remove()
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
        self._restore_signal_handlers()

    def create(self) -> None:
        """Create the bridge, then one namespace, veth pair and pair of tbf qdiscs per rank."""
        log.info("creating %d namespaces at %s (tag %s)", self.ranks, self.rate, self.tag)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        for rank in range(self.ranks):
            namespace = namespace_name(self.tag, rank)
            veth = self.veth(rank)
            _run("ip", "netns", "add", namespace)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _run("ip", "link", "set", veth, "master", self.bridge)
            _run("ip", "link", "set", veth, "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
            _run("ip", "-n", namespace, "addr", "add", f"{SUBNET}.{rank + 1}/24", "dev", "eth0")
            _run("ip", "-n", namespace, "link", "set", "eth0", "up")
            # Egress of eth0 limits what the rank sends; egress of the host end limits what it receives.
            _run(*_tbf(self.rate_bits, "eth0", namespace))
            _run(*_tbf(self.rate_bits, veth))

    def remove(self) -> None:
        """Delete every namespace and link of this emulation; safe to call more than once."""
        for rank in range(self.ranks):
            # Deleting a namespace deletes the veth pair with it.
            _run("ip", "netns", "delete", namespace_name(self.tag, rank), check=False)
            _run("ip", "link", "delete", self.veth(rank), check=False)
        _run("ip", "link", "delete", self.bridge, check=False)
        own = {self.bridge, *(namespace_name(self.tag, r) for r in range(self.ranks)),
               *(self.veth(r) for r in range(self.ranks))}
        remaining = [name for name in leftovers(self.tag) if name in own]
        if remaining:
            log.error("could not remove %s; delete them with 'ip netns delete' and 'ip link delete'",
                      ", ".join(remaining))
        else:
            log.info("removed the namespaces and links of tag %s", self.tag)

    def mpiexec_command(self, mpiexec: str, ranks: int, command: list[str]) -> list[str]:
        """Return an mpiexec command line that runs ``command`` on each rank inside its namespace."""
        return [mpiexec, "-n", str(ranks), sys.executable, "-m", "hpcdl.bench.emulate", self.tag, "--", *command]

    def _install_signal_handlers(self) -> None:
        # SIGTERM becomes SystemExit so the context manager's exit removes the links.
        def _terminate(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        if hasattr(signal, "SIGTERM"):
            self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _terminate)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, remainder = divmod(number, 36)
        out = digits[remainder] + out
        if number == 0:
            return out


def main(argv: list[str] | None = None) -> None:
    """Enter this rank's namespace and exec the command: ``python -m hpcdl.bench.emulate TAG -- CMD``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m hpcdl.bench.emulate TAG -- COMMAND [ARGS...]")
    tag, command = argv[0], argv[2:]
    rank = os.environ.get("PMI_RANK")
    if rank is None:
        raise SystemExit("hpcdl.bench.emulate must run under mpiexec: PMI_RANK is not set.")
    namespace = namespace_name(tag, int(rank))
    os.execvp("ip", ["ip", "netns", "exec", namespace, *command])


if __name__ == "__main__":
    main()
