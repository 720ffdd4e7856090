"""A real single-node Slurm cluster on this machine, for the job-script tests.

Debian's slurm-wlm daemons (slurmctld, slurmd) and munge, installed from apt when missing, run from a
private directory: their own config, munge key and socket, state, spool and logs, on free TCP ports, so
that they never touch a system Slurm or munge. The node is this machine as `slurmd -C` describes it
(CPUs, sockets, cores, memory); select/cons_tres; process tracking by cgroup where this kernel and Slurm
allow it, else by /proc (`proctrack`); KillWait=30 as on most clusters. Jobs are accounted through
jobcomp/filetxt, which `sacct --completion` reads (no slurmdbd/MySQL needed).

    python -m tests.jobs.slurm_cluster /tmp/slurm     # start one by hand; Ctrl-C stops it
    SLURM_CONF=/tmp/slurm/etc/slurm.conf sinfo

Everything that goes wrong raises SlurmError with one line saying what and where the logs are.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The Debian packages the cluster needs and the programs each provides.
PACKAGES = {"slurmctld": ["slurmctld"], "slurmd": ["slurmd"], "munge": ["munged", "munge"],
            "slurm-client": ["sbatch", "scontrol", "sinfo", "squeue", "sacct", "scancel", "srun"]}
KILL_WAIT = 30  # seconds between Slurm's SIGTERM and SIGKILL when a job ends (slurm.conf KillWait)
# A requeued job may start again only `cred_expire` + 1 s after it ended (Slurm's default 120 s). A
# short one keeps the requeue tests fast; step credentials still have to outlive a step's launch.
CRED_EXPIRE = 10


class SlurmError(RuntimeError):
    """The cluster could not be installed, started or asked something."""


def _missing_programs() -> list[str]:
    return [prog for progs in PACKAGES.values() for prog in progs
            if shutil.which(prog) is None and not Path("/usr/sbin", prog).exists()]


def ensure_installed() -> None:
    """Install slurm-wlm's daemons and client and munge from apt when any program is missing."""
    missing = _missing_programs()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmError(f"Slurm/munge programs missing ({', '.join(missing)}) and cannot install them here "
                         f"(needs root and apt-get): apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise SlurmError(f"'{' '.join(cmd)}' failed with exit {proc.returncode}: {tail[0]}")
    if _missing_programs():
        raise SlurmError(f"still missing after apt-get install: {', '.join(_missing_programs())}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This machine as slurmd sees it: 'NodeName=... CPUs=... ... RealMemory=...'."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60)
    line = out.stdout.splitlines()[0] if out.stdout else ""
    if out.returncode != 0 or not line.startswith("NodeName="):
        raise SlurmError(f"'slurmd -C' did not describe this node: {(out.stderr or out.stdout).strip()[:200]}")
    return line


class LocalSlurm:
    """Start with ``start()``, stop with ``stop()``; ``env`` is what Slurm's client commands need."""

    def __init__(self, root: Path, proctrack: str = "auto"):
        self.root = Path(root)
        self.etc, self.run_dir, self.log_dir = self.root / "etc", self.root / "run", self.root / "log"
        self.conf = self.etc / "slurm.conf"
        self.requested_proctrack = proctrack
        self.proctrack = ""
        self.node = ""
        self.cpus = 0
        self._procs: dict[str, subprocess.Popen] = {}
        self._socket_dir: Path | None = None
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for name in list(self.env):  # this process may itself run inside a Slurm job
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
                del self.env[name]
        self.env["PATH"] = f"{self.env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"

    # --- configuration -------------------------------------------------------------------------------
    def _write_config(self, proctrack: str) -> None:
        node_line = _node_line()
        fields = dict(kv.split("=", 1) for kv in node_line.split())
        self.node, self.cpus = fields["NodeName"], int(fields["CPUs"])
        for d in (self.etc, self.run_dir, self.log_dir, self.root / "state", self.root / "spool", self.root / "munge"):
            d.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o755)  # munged insists that everyone may reach its socket
        (self.root / "munge").chmod(0o700)
        self.root.chmod(0o755)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        # munged wants every directory above its socket searchable by all, which pytest's temporary
        # directories (0700) are not: the socket lives in a directory of its own under /tmp.
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="megdet-munge-"))
            self._socket_dir.chmod(0o755)
        self.munge_socket = self._socket_dir / "munge.socket"
        self.conf.write_text("\n".join([
            "# Written by tests/jobs/slurm_cluster.py: a single-node cluster for the job-script tests.",
            "ClusterName=megdet-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.run_dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.run_dir / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "MailProg=/bin/true",
            f"ProctrackType=proctrack/{proctrack}",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            f"KillWait={KILL_WAIT}",
            "ReturnToService=2",
            "MinJobAge=3600",
            "SchedulerType=sched/backfill",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.log_dir / 'jobcomp.txt'}",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            f"{node_line.split(' RealMemory=')[0]} NodeAddr=127.0.0.1 RealMemory={fields['RealMemory']} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            ""]))
        # Only read with proctrack/cgroup; autodetect picks cgroup v1 or v2, and without systemd the
        # v2 plugin must create its own hierarchy.
        (self.etc / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    # --- daemons ---------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log_dir / f"{name}.out", "ab")
        self._procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=self.env, start_new_session=True)
        out.close()

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode} at start-up: "
                                 f"{self._tail(name)} (logs in {self.log_dir})")

    def _tail(self, name: str) -> str:
        for path in (self.log_dir / f"{name}.out", self.log_dir / f"{name}.log"):
            if path.exists():
                lines = [ln for ln in path.read_text(errors="replace").splitlines() if "error" in ln.lower()]
                if lines:
                    return lines[-1].strip()
        return "no error line in its log"

    def _start_daemons(self, proctrack: str) -> None:
        self._write_config(proctrack)
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}",
                               f"--key-file={self.root / 'munge' / 'munge.key'}",
                               f"--pid-file={self.run_dir / 'munged.pid'}", f"--log-file={self.log_dir / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged to create its socket", 20)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, f"node {self.node} to be idle in sinfo", 60)

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True,
                             timeout=30).stdout.split()
        return out == [self.node, "idle"]

    def _wait(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what} (logs in {self.log_dir})")
            time.sleep(0.2)

    def _smoke_job(self) -> None:
        """A one-step job must complete: proves munge credentials, slurmstepd and process tracking."""
        proc = subprocess.run(["srun", "--ntasks=1", "--time=1", "--quiet", "true"], env=self.env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SlurmError(f"a one-task srun failed ({proc.returncode}): "
                             f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}; slurmd: {self._tail('slurmd')}")

    def start(self) -> "LocalSlurm":
        ensure_installed()
        choices = ["cgroup", "linuxproc"] if self.requested_proctrack == "auto" else [self.requested_proctrack]
        reasons = []
        for proctrack in choices:
            try:
                self._start_daemons(proctrack)
                self._smoke_job()
            except (SlurmError, subprocess.TimeoutExpired) as err:
                reasons.append(f"proctrack/{proctrack}: {err}")
                self.stop()
                continue
            self.proctrack = proctrack
            return self
        raise SlurmError("Slurm cannot run on this machine; " + "; ".join(reasons))

    def stop(self) -> None:
        """Kill every job, then stop slurmd, slurmctld and munged, each by the PID we started."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--signal=KILL", "--full", "--user", str(os.geteuid())], env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while self.jobs_running() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._socket_dir is not None and "munged" not in self._procs:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    # --- asking it things --------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> str:
        """Run a Slurm client command with this cluster's SLURM_CONF (``env``: the whole environment
        instead, as a user's shell has it; it must name SLURM_CONF itself)."""
        proc = subprocess.run(list(argv), env=self.env if env is None else env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"'{' '.join(argv)}' failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def jobs_running(self) -> bool:
        try:
            return bool(self.run("squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i", check=False).strip())
        except subprocess.TimeoutExpired:
            return True

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, BatchHost, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def sacct(self, job_id: str) -> list[dict[str, str]]:
        """One record per run of the job (a requeued job has several), oldest first, from the
        job-completion log (`sacct --completion`; with slurmdbd a site runs `sacct -j ID -D`)."""
        fields = ["JobID", "State", "ExitCode", "Start", "End"]
        out = self.run("sacct", "--completion", "-j", job_id, "-n", "-P", "-o", ",".join(fields))
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the cluster too
    cluster = LocalSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/megdet-slurm"))
    try:
        cluster.start()
        print(f"Slurm up (proctrack/{cluster.proctrack}): export SLURM_CONF={cluster.conf}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
