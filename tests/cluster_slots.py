"""Which part of 198.18.0.0/24 a test cluster takes, and what every cluster on this machine shares.

One machine may run several test clusters at once: one per pytest-xdist worker, one started by hand,
another checkout's test session. A session killed by SIGKILL (a CI timeout, a lost terminal) leaves its
cluster running. So the range is cut into SLOTS slots of /27, and a cluster claims one under a lock:
REGISTRY holds a file per claimed slot naming its owner (PID and start time), its root directory and any
other path it made. A claim takes the first slot that is free; a slot whose owner has died is freed
first (whatever still runs in its namespaces is killed, its namespaces, bridge and paths removed, with
one line on stderr). A slot holding namespaces or a bridge that no entry explains is left alone.

Directories outside a cluster's root that every cluster uses (mount points, sshd's privilege-separation
directory) are made by the first cluster and removed by the last to release its slot: removing a mount
point would detach the mounts made on it in the other clusters' hosts.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NETWORK = ipaddress.ip_network("198.18.0.0/24")  # the benchmarking range, and no other
SLOTS = list(NETWORK.subnets(new_prefix=27))      # 8 slots of 30 addresses: up to 8 hosts and a bridge
REGISTRY = Path("/run/megdet-clusters")
LOCK = Path("/run")  # flock'ed while the registry changes: a directory that is always there, no file left


@dataclass(frozen=True)
class Slot:
    index: int

    @property
    def tag(self) -> str:
        """Prefix of the slot's namespaces and links."""
        return f"mgd{self.index}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return SLOTS[self.index]

    @property
    def bridge(self) -> str:
        return f"{self.tag}br0"

    @property
    def entry(self) -> Path:
        return REGISTRY / f"{self.tag}.cluster"

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=60).stdout
        return [line.split()[0] for line in out.splitlines() if line.split() and line.startswith(f"{self.tag}-")]

    def in_use(self) -> bool:
        return bool(self.namespaces()) or Path(f"/sys/class/net/{self.bridge}").exists()


@contextmanager
def _locked():
    fd = os.open(LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(lines: list[str]) -> bool:
    """Entry lines: PID, its start time, root, other paths (an entry of one line: PID only)."""
    if not lines or not lines[0].isdigit():
        return False
    started = _start_time(int(lines[0]))
    return started is not None and (len(lines) < 2 or started == lines[1])


def claim(root: Path) -> Slot:
    """The first free slot, registered to this process with ``root``; every dead owner's slot is freed first."""
    with _locked():
        REGISTRY.mkdir(parents=True, exist_ok=True)
        for slot in map(Slot, range(len(SLOTS))):
            if slot.entry.exists():
                lines = slot.entry.read_text().split("\n")
                if not _owner_alive(lines):
                    _free(slot, [Path(p) for p in lines[2:] if p])
        for slot in map(Slot, range(len(SLOTS))):
            if not slot.entry.exists() and not slot.in_use():  # in use without an entry: not ours to remove
                slot.entry.write_text(f"{os.getpid()}\n{_start_time(os.getpid())}\n{root}\n")
                return slot
    raise RuntimeError(f"all {len(SLOTS)} test-cluster slots of {NETWORK} are in use ({REGISTRY})")


def note_path(slot: Slot, path: Path) -> None:
    """Remove ``path`` too if this slot's owner dies without releasing it."""
    with _locked(), open(slot.entry, "a") as entry:
        entry.write(f"{path}\n")


def make_shared(path: Path, mode: int) -> None:
    """Make ``path`` (a directory every cluster uses) unless it exists; the last release removes it."""
    with _locked():
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            return
        with open(REGISTRY / "made", "a") as made:
            made.write(f"{path}\n")


def release(slot: Slot) -> None:
    """Unregister ``slot`` (its cluster has stopped); the last one out removes the shared directories."""
    with _locked():
        slot.entry.unlink(missing_ok=True)
        if REGISTRY.is_dir() and not any(REGISTRY.glob("*.cluster")):
            made = REGISTRY / "made"
            for line in reversed(made.read_text().split() if made.exists() else []):
                shutil.rmtree(line, ignore_errors=True)
            shutil.rmtree(REGISTRY, ignore_errors=True)


def kill_until_gone(find_pids) -> None:
    """SIGKILL whatever ``find_pids()`` lists until it lists nothing (5 s at most): a process may fork
    while its siblings die."""
    for _ in range(50):
        pids = find_pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _free(slot: Slot, paths: list[Path]) -> None:
    """Take back the slot of a dead owner: kill what runs in its hosts, remove namespaces, bridge, paths."""
    namespaces = slot.namespaces()
    kill_until_gone(lambda: [int(p) for ns in namespaces for p in subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=60).stdout.split()])
    # The hosts' links first: a namespace is destroyed asynchronously, and its veth peers with it, so a
    # new cluster in this slot could find them still there ("File exists").
    for link in os.listdir("/sys/class/net"):
        if link.startswith(f"{slot.tag}v"):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=60)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)
    subprocess.run(["ip", "link", "del", slot.bridge], capture_output=True, timeout=60)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    slot.entry.unlink(missing_ok=True)
    print(f"tests/cluster_slots.py: removed test cluster {slot.tag} left by a process that died "
          f"(namespaces {namespaces}, {len(paths)} paths)", file=sys.stderr)
