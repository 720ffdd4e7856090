"""Installing what the test clusters run, from apt when a program is missing: Slurm, munge and OpenSSH
for tests/cluster.py; tests/jobs/pbs_install.py adds OpenPBS's runtime packages through ``apt_install``."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess

PACKAGES = {"slurmctld": ["slurmctld"], "slurmd": ["slurmd"], "munge": ["munged", "munge"],
            "slurm-client": ["sbatch", "scontrol", "sinfo", "squeue", "sacct", "scancel", "srun"],
            "openssh-server": ["sshd"], "openssh-client": ["ssh", "ssh-keygen"]}
SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APT_LOCK = "/run/megdet-apt.lock"
# apt-get waits this long for dpkg's lock held by another program (unattended-upgrades, a user's apt)
# instead of failing at once; 0 by default.
DPKG_LOCK_TIMEOUT_S = 600


class InstallError(RuntimeError):
    """A package could not be installed (one line: the command and apt's last line)."""


def _missing_programs() -> list[str]:
    return [p for progs in PACKAGES.values() for p in progs if shutil.which(p, path=SBIN) is None]


def ensure_installed() -> None:
    """Install Slurm, munge and OpenSSH from apt when any of their programs is missing."""
    if not _missing_programs():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InstallError(f"missing {', '.join(_missing_programs())} and cannot install them here "
                           f"(needs root and apt-get): apt-get install {' '.join(PACKAGES)}")
    with apt_lock():  # another test worker may be installing them right now: look again once it is done
        if _missing_programs():
            apt_install(list(PACKAGES))
    if _missing_programs():
        raise InstallError(f"still missing after apt-get install: {', '.join(_missing_programs())}")


@contextlib.contextmanager
def apt_lock():
    """One installer at a time on this machine: pytest-xdist's workers each start a cluster, and on a fresh
    machine both went to apt at once (the second failed on dpkg's lock, and every test of its cluster)."""
    with open(APT_LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def apt_install(packages: list[str]) -> None:
    """`apt-get update` then install ``packages``; a failure raises InstallError with apt's last line."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    wait = ["-o", f"DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT_S}"]
    for cmd in (["apt-get", "update", "-qq", *wait],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *wait, *packages]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise InstallError(f"'{' '.join(cmd)}' failed with exit {proc.returncode}: {tail[0]}")
