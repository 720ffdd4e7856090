"""A cluster of several hosts on this machine, for the tests that need real hostnames: Slurm, ssh, mpirun.

Each host is a Linux network namespace with its own address in 198.18.0.0/24 (the benchmarking range;
no route leaves it) and its own hostname (UTS namespace), joined to the others by a bridge. Several
clusters can share the machine, each in a slot of the range of its own (tests/cluster_slots.py). Names
resolve through a hosts file bind-mounted over /etc/hosts in each host's private mount namespace: the
machine's own /etc/hosts is never changed. Every host runs an sshd (key login for root) and a slurmd;
the first host also runs slurmctld, and one munged serves them all. The file system is shared, as a
cluster's home and parallel file systems are, except /srv: each host has its own there (a node-local
disk) and root's ~/.ssh (the cluster's key and ssh config). tests/cluster_files.py writes its files.

    python -m tests.cluster /tmp/megdet-cluster 2     # two hosts by hand; Ctrl-C (or kill PID) stops them
    python -m tests.cluster /tmp/other 2              # a second cluster beside it, in another slot
    SLURM_CONF=/tmp/megdet-cluster/etc/slurm.conf sinfo
    nsenter -t $(cat /tmp/megdet-cluster/run/node01.pid) -n -u -m bash    # a shell on node01

Everything it starts is stopped by its PID, and every process still inside one of its network
namespaces is killed, then the namespaces, links, mounts and files are removed: `stop()` leaves the
machine as it found it, also after a failed test. Every failure raises ClusterError with one line
saying what and where the logs are.

Facts this rests on (Debian 12, Slurm 22.05): `ip netns exec` remounts /sys, so hosts are entered with
`nsenter --net=... unshare --uts --mount`; daemons run in their own session (a signal to the caller's
process group must not reach them); munged wants its socket directory searchable by all; slurmd's of
one machine share the cgroup hierarchy, so processes are tracked by /proc (proctrack/linuxproc), and
each node gets its own TmpFS; both hosts share the machine's cores.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import cluster_files, cluster_slots
from tests.cluster_files import CRED_EXPIRE, KILL_WAIT, LOCAL_SCRATCH  # noqa: F401 (the tests' names)
from tests.cluster_install import SBIN, InstallError, ensure_installed

class ClusterError(RuntimeError):
    """The cluster could not be installed, started or asked something."""


def why_unavailable() -> str | None:
    """Why no cluster can be built here (a reason to skip), or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces, bind mounts and daemons on port 22 need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool, path=SBIN) is None:
            return f"'{tool}' is not installed (iproute2, util-linux)"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise ClusterError(f"'{' '.join(argv)}' failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class Cluster:
    """``start()`` builds it, ``stop()`` removes it. ``hosts``: the host names (node01, node02, ...);
    ``env``: what Slurm's client commands need; ``run(host, argv)`` runs a command on a host."""

    def __init__(self, root: Path, nhosts: int = 2):
        if not 1 <= nhosts <= 8:
            raise ValueError("1 to 8 hosts")
        self.root = Path(root)
        self.hosts = [f"node{i:02d}" for i in range(1, nhosts + 1)]
        self.slot: cluster_slots.Slot | None = None  # claimed by start(): tag, addresses, bridge
        self.etc, self.run_dir, self.log_dir = self.root / "etc", self.root / "run", self.root / "log"
        self.conf = self.etc / "slurm.conf"
        self.ssh_dir = self.root / "ssh"
        self.ssh_config = self.ssh_dir / "config"
        self.ssh_key = self.ssh_dir / "id_ed25519"
        self.munge_socket = self.run_dir / "munge" / "munge.socket"
        self.home_ssh = self.root / "home" / ".ssh"  # root's ~/.ssh on the hosts
        self.holders: dict[str, subprocess.Popen] = {}   # host -> the process that holds its namespaces
        self._daemons: list[tuple[str, str, subprocess.Popen]] = []  # (host, name, process)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env.update(SLURM_CONF=str(self.conf), PATH=f"{os.environ.get('PATH', '')}:{SBIN}")

    def scratch(self, host: str) -> Path:
        """``host``'s local disk: what the host sees at LOCAL_SCRATCH (/srv), and no other host sees."""
        return self.root / "scratch" / host

    @property
    def tag(self) -> str:
        return self.slot.tag  # prefix of the namespaces and links: clusters in other slots never collide

    @property
    def subnet(self):
        return self.slot.subnet

    @property
    def bridge(self) -> str:
        return self.slot.bridge

    @property
    def addr(self) -> dict[str, str]:
        """Each host's address: the first of the slot's range (the bridge, this machine's side, has the last)."""
        return {h: str(a) for h, a in zip(self.hosts, self.subnet.hosts())}

    @property
    def bridge_addr(self) -> str:
        return str(list(self.subnet.hosts())[-1])

    def netns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def link(self, host: str) -> str:
        return f"{self.tag}v{self.hosts.index(host) + 1}"

    # --- bringing it up ----------------------------------------------------------------------------------
    def start(self) -> "Cluster":
        reason = why_unavailable()
        if reason:
            raise ClusterError(reason)
        try:
            ensure_installed()
        except InstallError as err:
            raise ClusterError(str(err)) from None
        try:
            self.slot = cluster_slots.claim(self.root)
        except RuntimeError as err:
            raise ClusterError(str(err)) from None
        try:
            self._network()
            cluster_files.write_files(self)
            for host in self.hosts:
                self._start_host(host)
            self._start_slurm()
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.bridge_addr}/{self.subnet.prefixlen}", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for host in self.hosts:
            ns = self.netns(host)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", self.link(host), "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", self.link(host), "master", self.bridge, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.addr[host]}/{self.subnet.prefixlen}", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")   # no default route: nothing leaves 198.18.0.0/24

    def _start_host(self, host: str) -> None:
        """The holder: a process in the host's network namespace that made its UTS and mount namespaces
        (hostname, /etc/hosts) and sleeps; daemons and commands join all three through its PID."""
        script = (f"hostname {host} && mount --bind {self.etc / 'hosts'} /etc/hosts && "
                  f"mount --bind {self.home_ssh} /root/.ssh && mount --bind {self.scratch(host)} {LOCAL_SCRATCH} && "
                  f"exec sleep infinity")
        holder = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns(host)}", "unshare", "--uts", "--mount",
                                   "--propagation", "slave", "sh", "-c", script],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)
        self.holders[host] = holder
        self._wait(lambda: _comm(holder.pid) == "sleep" or holder.poll() is not None, f"{host}'s namespaces", 20)
        if holder.poll() is not None:
            raise ClusterError(f"{host}: could not make its namespaces: {holder.stderr.read().decode().strip()}")
        (self.run_dir / f"{host}.pid").write_text(f"{holder.pid}\n")
        self._daemon(host, "sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.ssh_dir / "sshd_config")])

    def _daemon(self, host: str, name: str, argv: list[str]) -> None:
        out = open(self.log_dir / f"{name}-{host}.out", "ab")
        proc = subprocess.Popen(self.enter(host) + argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        out.close()
        self._daemons.append((host, name, proc))

    def _start_slurm(self) -> None:
        head = self.hosts[0]
        self._daemon(head, "munged", ["munged", "-F", f"--socket={self.munge_socket}",
                                      f"--key-file={self.root / 'munge' / 'munge.key'}",
                                      f"--pid-file={self.run_dir / 'munged.pid'}",
                                      f"--log-file={self.log_dir / 'munged.log'}",
                                      f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait(self.munge_socket.exists, "munged's socket", 20)
        self._daemon(head, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for host in self.hosts:
            self._daemon(host, "slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._all_idle, f"nodes {','.join(self.hosts)} idle in sinfo", 60)
        for host in self.hosts:  # ssh works between every pair of hosts: mpirun's and horovodrun's path
            out = self.run(self.hosts[0], ["ssh", "-F", str(self.ssh_config), host, "hostname"], check=False)
            if out.stdout.strip() != host:
                raise ClusterError(f"ssh from {self.hosts[0]} to {host} failed: {out.stderr.strip()} "
                                   f"(sshd log {self.log_dir / f'sshd-{host}.out'})")

    def _all_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True,
                             timeout=30).stdout.split("\n")
        return sorted(line.strip() for line in out if line.strip()) == [f"{h} idle" for h in self.hosts]

    def _wait(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for host, name, proc in self._daemons:
                if proc.poll() is not None:
                    raise ClusterError(f"{name} on {host} exited with {proc.returncode}: "
                                       f"{_last_error(self.log_dir, name, host)} (logs in {self.log_dir})")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what} (logs in {self.log_dir})")
            time.sleep(0.1)

    # --- using it ------------------------------------------------------------------------------------------
    def enter(self, host: str, cwd: str | Path | None = None) -> list[str]:
        """The command prefix that runs a program on ``host`` (its network, hostname and /etc/hosts),
        in ``cwd`` (default /: entering a mount namespace leaves the working directory)."""
        return ["nsenter", "-t", str(self.holders[host].pid), "-n", "-u", "-m",
                *([f"--wd={cwd}"] if cwd else []), "--"]

    def run(self, host: str, argv: list[str], check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None, cwd: str | Path | None = None, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.enter(host, cwd) + list(argv), env=self.env if env is None else env,
                              capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise ClusterError(f"{host}: '{' '.join(argv)}' failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return proc

    def popen(self, host: str, argv: list[str], cwd: str | Path | None = None, **kw) -> subprocess.Popen:
        """Start a command on ``host`` in a session of its own (stop it with kill_host or by its PID)."""
        kw.setdefault("env", self.env)
        return subprocess.Popen(self.enter(host, cwd) + list(argv), start_new_session=True, **kw)

    def slurm(self, *argv: str, check: bool = True, timeout: float = 60, env=None, cwd=None) -> str:
        """A Slurm client command (from this machine, which reaches slurmctld over the bridge)."""
        proc = subprocess.run(list(argv), env=self.env if env is None else env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"'{' '.join(argv)}' failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def mpi_env(self) -> dict[str, str]:
        """Open MPI and Horovod settings for this cluster: TCP over the hosts' range only, no core binding
        (every host shares this machine's cores). ssh needs none: root's home on the hosts has the key."""
        # The hosts share this machine's cores, more ranks than cores: a rank waiting in MPI yields its
        # core (Open MPI does so by itself only when it knows it oversubscribes): smoke steps on 2 x 2
        # ranks went from ~4 s to ~1.1 s, and the CPU they burn halved.
        return {"OMPI_MCA_mpi_yield_when_idle": "1",
                "OMPI_MCA_oob_tcp_if_include": str(self.subnet), "OMPI_MCA_btl_tcp_if_include": str(self.subnet),
                "OMPI_MCA_hwloc_base_binding_policy": "none", "OMPI_MCA_rmaps_base_oversubscribe": "1",
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "HOROVOD_GLOO_IFACE": "eth0"}

    def processes(self, host: str) -> list[int]:
        """PIDs of every process in ``host``'s network namespace, its holder included."""
        inode = _ns_inode(f"/run/netns/{self.netns(host)}")
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and inode is not None and _ns_inode(f"/proc/{entry}/ns/net") == inode:
                pids.append(int(entry))
        return pids

    def kill_host(self, host: str, sig: int = signal.SIGKILL) -> list[int]:
        """Every process of ``host`` gets ``sig`` at once (SIGKILL: the host has crashed)."""
        pids = self.processes(host)
        for pid in pids:
            _kill(pid, sig)
        return pids

    def partition(self, host: str, connected: bool = False) -> None:
        """Cut ``host`` off the bridge (``connected=True`` joins it again)."""
        _sh("ip", "link", "set", self.link(host), "up" if connected else "down")

    def restart_host(self, host: str) -> None:
        """Bring a killed host back: namespaces, sshd and slurmd (slurmd registers again by itself)."""
        self.partition(host, connected=True)
        self._daemons = [d for d in self._daemons if d[0] != host or d[2].poll() is None]
        self._start_host(host)
        if host == self.hosts[0]:
            raise ClusterError("restarting the head node (slurmctld, munged) is not supported")
        self._daemon(host, "slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._all_idle, f"{host} idle again", 90)

    # --- taking it down ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, stop the daemons by PID, kill whatever is left in the namespaces, remove the
        namespaces, links, mounts (they die with their namespaces) and release the slot (the last cluster
        to stop removes the directories made outside the roots: /root/.ssh, /run/sshd, /srv)."""
        if self.slot is None:
            return
        if any(name == "slurmctld" and p.poll() is None for _, name, p in self._daemons):
            subprocess.run(["scancel", "--signal=KILL", "--full", "--user", str(os.geteuid())], env=self.env,
                           capture_output=True, timeout=30)
        for _, _, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
        for _, _, proc in reversed(self._daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._daemons.clear()
        for host in self.hosts:  # jobs' ranks, orted, ssh sessions: anything still in a host
            cluster_slots.kill_until_gone(lambda h=host: self.processes(h))
        for proc in self.holders.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self.holders.clear()
        for host in self.hosts:
            _sh("ip", "netns", "del", self.netns(host), check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        cluster_slots.release(self.slot)
        self.slot = None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _last_error(log_dir: Path, name: str, host: str) -> str:
    for path in (log_dir / f"{name}-{host}.out", log_dir / f"{name}.log", log_dir / f"{name}-{host}.log"):
        if path.exists():
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if re.search("error|fatal", ln, re.I)]
            if lines:
                return lines[-1].strip()
    return "no error line in its log"


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGINT):  # `kill PID` stops it too (and INT, ignored in background jobs)
        signal.signal(sig, signal.default_int_handler)
    cluster = Cluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/megdet-cluster"),
                      int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    try:
        cluster.start()
        print(f"{len(cluster.hosts)} hosts up ({', '.join(cluster.hosts)}, slot {cluster.tag}, {cluster.subnet}): export SLURM_CONF={cluster.conf}; "
              f"a shell on a host: nsenter -t $(cat {cluster.run_dir}/HOST.pid) -n -u -m bash", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
