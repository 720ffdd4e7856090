"""A real OpenPBS on the hosts of the test cluster (tests/cluster.py), for the tests that submit jobs/pbs/megdet.pbs.

The head host (node01) runs the server with its PostgreSQL, the scheduler and the comm; every host
runs a MoM, so `select=2:...` places a job on two hosts as on a real cluster. OpenPBS is not packaged
for Debian or PyPI: /opt/pbs comes from the build in ../shared/openpbs (extracted when missing), its
runtime libraries and PostgreSQL from apt. Each host has its own PBS_HOME and configuration file
(PBS_CONF_FILE) in a private directory; /etc/pbs.conf and the init scripts are never written. Jobs run
as an ordinary user (`megdet`, made when missing): the MoM does not track root's jobs.

    python -m tests.jobs.pbs_cluster /tmp/megdet-pbs     # a 2-host cluster with PBS; Ctrl-C stops it

Facts this rests on (OpenPBS 23.06 built from cd7ab5ed, Debian 12, PostgreSQL 15):
- PBS refuses a PBS_HOME below a directory writable by others (/tmp, even sticky): the private
  directory is made in /var/spool.
- Every daemon detaches, and PID 1 of a container may reap no orphans: each host's daemons are
  started by a small reaper (a child subreaper, tests/jobs/reaper.py) that collects them, and kills what is left at the end.
- sshd reads a user's authorized keys as that user: the cluster's key file must be reachable by the
  job user (its directories get o+x, its key file o+r, restored at the end); the user gets its own
  copy of the cluster's private key and an ssh config in its home.
- `qdel` and `qrerun` send SIGTERM to the job's processes on the first host, SIGKILL `kill_delay`
  later (the queue's attribute, 10 s by default; the MoM checks on a timer, so it can be later).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import cluster_slots
from tests.cluster import Cluster
from tests.jobs.pbs_user import NAME as USER_NAME, JobUser
from tests.jobs.pbs_install import PBS_EXEC, PBSError, ensure_installed, why_unavailable  # noqa: F401 (conftest's)

REAPER = Path(__file__).with_name("reaper.py")  # started on every host
PRIVATE_PARENT = Path("/var/spool")  # a parent no one else can write to (PBS checks every ancestor)
KILL_DELAY = 30           # the queue's kill_delay: seconds from qdel's/qrerun's SIGTERM to the SIGKILL
PBS_PATH = f"{PBS_EXEC / 'bin'}:/usr/local/bin:/usr/bin:/bin"
RUNUSER = "/usr/sbin/runuser"
SBIN_PATH = f"{PBS_EXEC / 'sbin'}:{PBS_EXEC / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"



def _alive(pid: int | None) -> bool:
    """The process exists and is not a zombie."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    text = text.rsplit(":", 1)[-1]   # datastore/pbs_dblock holds host:pid
    return int(text) if text.isdigit() else None


class ClusterPBS:
    """``start()`` brings PBS up on ``cluster``'s hosts, ``stop()`` takes it down. ``qsub`` and the other
    client commands run on the head host (``client()``), as the job user (tests/jobs/pbs_user.py) by default."""

    def __init__(self, cluster: Cluster, root: Path | None = None):
        self.cluster = cluster
        self.head = cluster.hosts[0]
        self.root = Path(root) if root else None
        self.job_user = JobUser(cluster)
        self._reapers: dict[str, subprocess.Popen] = {}
        self._pids: list[tuple[str, str, int]] = []   # (host, daemon, PID) of every daemon started
        self._made_root = False

    # --- paths -------------------------------------------------------------------------------------------
    def home(self, host: str) -> Path:
        """PBS_HOME of ``host``."""
        return self.root / host

    def conf(self, host: str) -> Path:
        return self.root / "etc" / f"pbs.conf.{host}"

    @property
    def client_conf(self) -> Path:
        return self.root / "etc" / "pbs.conf"

    @property
    def user(self) -> str:
        return self.job_user.name

    @property
    def user_home(self) -> Path:
        return self.job_user.home

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    # --- bringing it up ----------------------------------------------------------------------------------
    def start(self) -> "ClusterPBS":
        ensure_installed()
        try:
            self._files()
            self.job_user.make(self.root)
            for host in self.cluster.hosts:
                self._start_host(host)
            self._configure()
        except BaseException:
            self.stop()
            raise
        return self

    def _files(self) -> None:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="hvd_megdet-pbs-", dir=PRIVATE_PARENT))
            self._made_root = True
            cluster_slots.note_path(self.cluster.slot, self.root)  # removed even if this process dies
        else:
            self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)   # the job user reads the client configuration and its files below
        for parent in [self.root, *self.root.parents]:
            mode = parent.stat().st_mode
            if mode & 0o022 and parent != Path("/"):
                raise PBSError(f"{parent} is writable by others: PBS refuses a PBS_HOME below it (use a "
                               f"directory in {PRIVATE_PARENT})")
        for d in (self.root / "etc", self.log_dir, self.root / "jobs"):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        for host in self.cluster.hosts:
            head = "1" if host == self.head else "0"
            self.conf(host).write_text("\n".join([
                f"PBS_EXEC={PBS_EXEC}", f"PBS_HOME={self.home(host)}", f"PBS_SERVER={self.head}",
                f"PBS_START_SERVER={head}", f"PBS_START_SCHED={head}", f"PBS_START_COMM={head}", "PBS_START_MOM=1",
                f"PBS_LEAF_NAME={host}", f"PBS_MOM_NODE_NAME={host}", ""]))
        self.client_conf.write_text(f"PBS_EXEC={PBS_EXEC}\nPBS_SERVER={self.head}\nPBS_HOME={self.home(self.head)}\n")
        for path in self.root.glob("etc/*"):
            path.chmod(0o644)
        shutil.copy(REAPER, self.root / "reaper.py")

    def _reaper(self, host: str) -> subprocess.Popen:
        if host not in self._reapers:
            self._reapers[host] = self.cluster.popen(host, [sys.executable, str(self.root / "reaper.py")],
                                                     stdin=subprocess.PIPE,
                                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                                     env={"PATH": SBIN_PATH})
        return self._reapers[host]

    def _spawn(self, host: str, name: str, argv: list[str], timeout: float = 120) -> None:
        """Run ``argv`` on ``host`` below its reaper, in a session of its own, and wait for it to exit
        (a daemon: until it has detached). Its output goes to log/<name>-<host>.out."""
        reaper = self._reaper(host)
        log = self.log_dir / f"{name}-{host}.out"
        env = {"PATH": SBIN_PATH, "PBS_CONF_FILE": str(self.conf(host)), "LANG": "C.UTF-8", "HOME": "/root"}
        reaper.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        reaper.stdin.flush()
        ready, _, _ = select.select([reaper.stdout], [], [], timeout)
        line = reaper.stdout.readline() if ready else ""
        if not line:
            raise PBSError(f"{host}: {name} did not {'finish' if not ready else 'run'} within {timeout:.0f} s "
                           f"(output in {log})")
        rc = json.loads(line)["rc"]
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise PBSError(f"{host}: {' '.join(argv)} exited with {rc}: {' | '.join(tail)} (logs in {self.log_dir})")

    def _start_host(self, host: str) -> None:
        home = self.home(host)
        # pbs_habitat makes PBS_HOME and, on the head, the database with the server's defaults (queue
        # workq, a node for this host), starting and stopping the server once.
        self._spawn(host, "pbs_habitat", [str(PBS_EXEC / "libexec" / "pbs_habitat")], timeout=180)
        (home / "mom_priv" / "config").write_text(f"$clienthost {self.head}\n$usecp *:/ /\n")
        if host == self.head:
            # Its socket next to its data, not in the machine's /var/run/postgresql.
            with open(home / "datastore" / "postgresql.conf", "a") as conf:
                conf.write(f"unix_socket_directories = '{home / 'datastore'}'\n")
            self._spawn(host, "pbs_comm", [str(PBS_EXEC / "sbin" / "pbs_comm")])
            self._pids.append((host, "pbs_comm", self._lock_pid(home / "server_priv" / "comm.lock", "pbs_comm")))
        self._spawn(host, "pbs_mom", [str(PBS_EXEC / "sbin" / "pbs_mom")])
        self._pids.append((host, "pbs_mom", self._lock_pid(home / "mom_priv" / "mom.lock", "pbs_mom")))
        if host == self.head:
            self._spawn(host, "pbs_sched", [str(PBS_EXEC / "sbin" / "pbs_sched")])
            self._pids.append((host, "pbs_sched", self._lock_pid(home / "sched_priv" / "sched.lock", "pbs_sched")))
            self._spawn(host, "pbs_server", [str(PBS_EXEC / "sbin" / "pbs_server")])
            self._pids.append((host, "pbs_server", self._lock_pid(home / "server_priv" / "server.lock", "pbs_server")))

    def _lock_pid(self, path: Path, name: str) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid = _read_pid(path)
            if _alive(pid):
                return pid
            time.sleep(0.1)
        raise PBSError(f"{name} wrote no live PID to {path} within 30 s (logs in {path.parents[1]})")

    def _configure(self) -> None:
        self._wait(lambda: self.client(["qstat", "-B"], user=None, check=False).returncode == 0,
                   "the server to answer", 60)
        known = self.client(["pbsnodes", "-a"], user=None, check=False).stdout
        for host in self.cluster.hosts:
            if f"\n{host}\n" not in f"\n{known}":
                self.qmgr(f"create node {host}")
        self.qmgr("set server job_history_enable = True")   # qstat -x shows finished jobs
        self.qmgr(f"set queue workq kill_delay = {KILL_DELAY}")
        self._wait(self._all_free, f"nodes {', '.join(self.cluster.hosts)} free in pbsnodes", 90)
        self._pids.append((self.head, "postgres", self._lock_pid(self.home(self.head) / "datastore" / "postmaster.pid",
                                                                 "postgres")))
        monitor = _read_pid(self.home(self.head) / "datastore" / "pbs_dblock")
        if monitor:
            self._pids.append((self.head, "pbs_ds_monitor", monitor))

    def _all_free(self) -> bool:
        out = self.client(["pbsnodes", "-a"], user=None, check=False).stdout
        states = {}
        for block in out.split("\n\n"):
            lines = block.strip().splitlines()
            if lines:
                states[lines[0].strip()] = next((ln.split("=", 1)[1].strip() for ln in lines
                                                 if ln.strip().startswith("state =")), "?")
        return all(states.get(h) == "free" for h in self.cluster.hosts)

    def _wait(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            dead = [f"{name} on {host}" for host, name, pid in self._pids if not _alive(pid)]
            if dead:
                raise PBSError(f"{', '.join(dead)} exited while waiting for {what} (logs under {self.root})")
            if time.monotonic() > deadline:
                raise PBSError(f"timed out after {timeout:.0f} s waiting for {what} (logs under {self.root})")
            time.sleep(0.2)

    # --- using it ----------------------------------------------------------------------------------------
    def user_env(self, **extra: str) -> dict[str, str]:
        """The environment of the job user's login shell on the head host: PBS's commands on PATH, and
        the cluster's MPI settings with the user's own ssh key and config (what `qsub -V` passes on)."""
        home = self.user_home
        env = {"PATH": PBS_PATH, "HOME": str(home), "USER": self.user, "LOGNAME": self.user, "SHELL": "/bin/bash",
               "LANG": "C.UTF-8", "PBS_CONF_FILE": str(self.client_conf)}
        mpi = {k: v for k, v in self.cluster.mpi_env().items() if not k.startswith("OMPI_ALLOW_RUN_AS_ROOT")}
        mpi["OMPI_MCA_plm_rsh_args"] = f"-F {home / '.ssh' / 'config'}"
        mpi["HOROVOD_ARGS"] = f"--network-interface eth0 --ssh-identity-file {home / '.ssh' / 'id_ed25519'}"
        return {**env, **mpi, **extra}

    def client(self, argv: list[str], user: str | None = USER_NAME, env: dict[str, str] | None = None,
               check: bool = True, timeout: float = 60, cwd: Path | str | None = None,
               host: str | None = None) -> subprocess.CompletedProcess:
        """A PBS client command on the head host (or ``host``): as the job user, in its login
        environment (plus ``env``), or as root with ``user=None``."""
        if user is None:
            full = {"PATH": SBIN_PATH, "PBS_CONF_FILE": str(self.client_conf), "LANG": "C.UTF-8", "HOME": "/root",
                    **(env or {})}
            cmd = list(argv)
        else:
            full = {**self.user_env(), **(env or {})}
            cmd = [RUNUSER, "-u", user, "--", *argv]
        if cwd is not None:  # entering the host's mount namespace loses the caller's directory
            cmd = ["/usr/bin/env", "-C", str(cwd), *cmd]
        proc = self.cluster.run(host or self.head, cmd, check=False, timeout=timeout, env=full)
        if check and proc.returncode != 0:
            raise PBSError(f"'{' '.join(argv)}' failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc

    def qmgr(self, command: str) -> None:
        """One qmgr command (several -c in one call apply only the last)."""
        self.client(["qmgr", "-c", command], user=None)

    def job(self, job_id: str) -> dict:
        """`qstat -xf` of a job (finished ones too) as a dict; {} when the server does not know it."""
        proc = self.client(["qstat", "-xf", "-F", "json", job_id], user=None, check=False)
        if proc.returncode != 0:
            return {}
        jobs = json.loads(proc.stdout).get("Jobs", {})
        return next(iter(jobs.values()), {})

    def workdir(self, name: str) -> Path:
        """A fresh directory ``jobs/name`` in the private directory, owned by the job user (OUTPUT_DIR,
        job output, shards); directories above it are made as needed."""
        path = self.root / "jobs" / name
        path.mkdir(parents=True)
        self.job_user.own(path)
        return path

    # --- taking it down ------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Delete every job, stop the server (qterm), scheduler, comm and MoMs and the database by PID,
        kill what the user left on the hosts, then remove the user (if made here), the private directory
        and the modes given to the cluster's files."""
        if self.root is None:
            return
        server = next((pid for host, name, pid in self._pids if name == "pbs_server"), None)
        if _alive(server):
            jobs = self.client(["qselect"], user=None, check=False).stdout.split()
            if jobs:
                self.client(["qdel", "-W", "force", *jobs], user=None, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.client(["qselect"], user=None, check=False).stdout.split():
                    time.sleep(0.5)
            self.client(["qterm", "-t", "quick"], user=None, check=False)
            self._wait_gone([server], 30)
        for host, name, pid in self._pids:
            if name != "pbs_server" and _alive(pid):
                _kill(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)   # postgres: fast shutdown
        self._wait_gone([pid for _, _, pid in self._pids], 30)
        for _, _, pid in self._pids:
            if _alive(pid):
                _kill(pid, signal.SIGKILL)
        self._pids.clear()
        self.job_user.kill_processes()
        for reaper in self._reapers.values():   # kills and reaps whatever is still below it
            try:
                reaper.stdin.close()
            except OSError:
                pass
        for reaper in self._reapers.values():
            try:
                reaper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                reaper.kill()
                reaper.wait(timeout=10)
            if reaper.stdout:
                reaper.stdout.close()
        self._reapers.clear()
        self.job_user.remove()
        if self._made_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self._made_root = False

    @staticmethod
    def _wait_gone(pids: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops it too
    where = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/megdet-pbs")
    cluster = Cluster(where / "cluster", 2)
    pbs = ClusterPBS(cluster)
    try:
        cluster.start()
        pbs.start()
        print(f"PBS up on {', '.join(cluster.hosts)} (PBS_HOME per host under {pbs.root}); a login shell of "
              f"{pbs.user} on {pbs.head}: nsenter -t $(cat {cluster.run_dir}/{pbs.head}.pid) -n -u -m runuser -l "
              f"{pbs.user}, then export PBS_CONF_FILE={pbs.client_conf}", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        pbs.stop()
        cluster.stop()
