"""OpenPBS for the test cluster: /opt/pbs from the build in ../shared/openpbs (extracted when missing),
its runtime libraries and PostgreSQL from apt."""
from __future__ import annotations

import glob
import subprocess
from pathlib import Path

from tests.cluster_install import InstallError, apt_install, apt_lock

REPO_ROOT = Path(__file__).resolve().parents[2]
PBS_EXEC = Path("/opt/pbs")
TARBALLS = REPO_ROOT.parent / "shared" / "openpbs" / "openpbs-*.tgz"
# What the binaries load (../shared/openpbs/runtime-libs.txt) that a Debian 12 base may lack, and the
# PostgreSQL server the PBS server keeps its state in (pg_config finds it).
PACKAGES = ["postgresql", "libpq5", "libical3", "libhwloc15", "libedit2", "libexpat1", "libssl3", "libcjson1",
            "libpython3.11"]


class PBSError(RuntimeError):
    """PBS could not be installed, started or asked something."""


def _tarball() -> Path | None:
    found = sorted(glob.glob(str(TARBALLS)))
    return Path(found[-1]) if found else None


def why_unavailable() -> str | None:
    """Why the PBS tests cannot run here (a reason to skip), or None."""
    if not (PBS_EXEC / "sbin" / "pbs_server").exists() and _tarball() is None:
        return f"OpenPBS is neither installed ({PBS_EXEC}) nor available to extract ({TARBALLS})"
    return None


def _missing_packages() -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *PACKAGES],
                         capture_output=True, text=True, timeout=60).stdout
    installed = {line.split()[0] for line in out.splitlines() if len(line.split()) > 1 and line.split()[1] == "ii"}
    return [p for p in PACKAGES if p not in installed]


def ensure_installed() -> None:
    """Extract ../shared/openpbs into / when /opt/pbs is missing; install the runtime packages from apt."""
    if not (PBS_EXEC / "sbin" / "pbs_server").exists():
        tarball = _tarball()
        if tarball is None:
            raise PBSError(f"no {PBS_EXEC} and no {TARBALLS} to extract")
        proc = subprocess.run(["tar", "-xzpf", str(tarball), "-C", "/"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise PBSError(f"extracting {tarball} failed: {proc.stderr.strip()[-300:]}")
    if _missing_packages():
        with apt_lock():
            try:
                if _missing_packages():
                    apt_install(_missing_packages())
            except InstallError as err:
                raise PBSError(str(err)) from None
    for tool in ("pbs_iff", "pbs_rcp"):  # they authenticate users' commands: setuid root
        path = PBS_EXEC / "sbin" / tool
        if path.stat().st_mode & 0o4000 == 0:
            path.chmod(0o4755)
