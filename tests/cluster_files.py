"""The files of a test cluster (tests/cluster.py): the hosts file its hosts see as /etc/hosts, ssh keys and
configs (root's ~/.ssh on the hosts), the munge key, each host's scratch, TmpFS and spool directories,
and slurm.conf."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tests import cluster_slots

if TYPE_CHECKING:
    from tests.cluster import Cluster

KILL_WAIT = 30    # seconds between Slurm's SIGTERM and SIGKILL when a job ends (KillWait, as on most sites)
# A requeued job may start again only `cred_expire` + 1 s after it ended (Slurm's default 120 s): short
# here so that requeue tests do not wait; credentials still outlive a step's launch.
CRED_EXPIRE = 5
LOCAL_SCRATCH = "/srv"  # each host's own directory is mounted here: a node-local disk (STAGE_DATA)


def write_files(c: "Cluster") -> None:
    """The hosts file, ssh keys and configs, the munge key, each host's directories and slurm.conf."""
    from tests.cluster import _sh  # a failure is one ClusterError line, as for every command of the cluster
    for d in (c.etc, c.run_dir, c.log_dir, c.ssh_dir, c.root / "state", c.munge_socket.parent):
        d.mkdir(parents=True, exist_ok=True)
    c.root.chmod(0o755)
    c.munge_socket.parent.chmod(0o755)  # munged: everyone must reach its socket
    (c.etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
        f"{c.addr[h]} {h}\n" for h in c.hosts) + f"{c.bridge_addr} {c.tag}-gateway\n")
    # ssh: one key for root's logins, one host key, an sshd_config and a client config of their own.
    for key in (c.ssh_key, c.ssh_dir / "host_ed25519"):
        if not key.exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    shutil.copy(c.ssh_key.with_suffix(".pub"), c.ssh_dir / "authorized_keys")
    c.ssh_dir.chmod(0o700)
    (c.ssh_dir / "sshd_config").write_text("\n".join([
        f"HostKey {c.ssh_dir / 'host_ed25519'}", f"AuthorizedKeysFile {c.ssh_dir / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "UsePAM no", "StrictModes no",
        "PidFile none", "AcceptEnv *", "PermitUserEnvironment no", "LogLevel ERROR", ""]))
    c.ssh_config.write_text("\n".join([
        "Host *", f"  IdentityFile {c.ssh_key}", "  IdentitiesOnly yes", "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", "  BatchMode yes", "  ConnectTimeout 10", ""]))
    # root's ~/.ssh on the hosts (bind-mounted over /root/.ssh there, as a cluster's shared home
    # has it): its key, authorized_keys and client config make `ssh node02` work as on a cluster,
    # for mpirun and horovodrun alike, and this machine's own ~/.ssh is never read or written.
    c.home_ssh.mkdir(parents=True, exist_ok=True)
    for name in ("id_ed25519", "id_ed25519.pub", "authorized_keys"):
        shutil.copy(c.ssh_dir / name, c.home_ssh / name)
    shutil.copy(c.ssh_config, c.home_ssh / "config")
    c.home_ssh.chmod(0o700)
    cluster_slots.make_shared(Path("/root/.ssh"), 0o700)  # the mount point
    cluster_slots.make_shared(Path("/run/sshd"), 0o755)  # sshd's privilege-separation directory
    munge_dir = c.root / "munge"
    munge_dir.mkdir(mode=0o700, exist_ok=True)
    key = munge_dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
    cluster_slots.make_shared(Path(LOCAL_SCRATCH), 0o755)  # the mount point of each host's local disk
    for host in c.hosts:
        c.scratch(host).mkdir(parents=True, exist_ok=True)
        (c.root / "tmp" / host).mkdir(parents=True, exist_ok=True)
        (c.root / "spool" / host).mkdir(parents=True, exist_ok=True)
    (c.root / "tmp").chmod(0o1777)
    for host in c.hosts:
        (c.root / "tmp" / host).chmod(0o1777)
    write_slurm_conf(c)

def write_slurm_conf(c: "Cluster") -> None:
    cpus = os.cpu_count() or 2
    memory = max(1024, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 / len(c.hosts) * 0.8))
    head = c.hosts[0]
    c.conf.write_text("\n".join([
        "# Written by tests/cluster.py: a cluster of network-namespace hosts on one machine.",
        f"ClusterName={c.tag}-test",
        f"SlurmctldHost={head}({c.addr[head]})",
        # Ports of their own: a site's Slurm on this machine (6817/6818) is never disturbed.
        "SlurmctldPort=16817", "SlurmdPort=16818",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={c.munge_socket},cred_expire={CRED_EXPIRE}",
        f"StateSaveLocation={c.root / 'state'}",
        f"SlurmdSpoolDir={c.root / 'spool'}/%n",
        f"SlurmctldPidFile={c.run_dir / 'slurmctld.pid'}",
        f"SlurmdPidFile={c.run_dir / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={c.log_dir / 'slurmctld.log'}",
        f"SlurmdLogFile={c.log_dir / 'slurmd-%n.log'}",
        f"TmpFS={c.root / 'tmp'}/%n",
        "SlurmctldDebug=info", "SlurmdDebug=info", "MailProg=/bin/true",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "MpiDefault=none", f"KillWait={KILL_WAIT}", "ReturnToService=2", "MinJobAge=3600",
        # Start jobs as soon as they are submitted or requeued: no batching delay, backfill and the main
        # scheduler every second (its default 60 s left a requeued job pending ~9 s past its BeginTime).
        "SchedulerType=sched/backfill",
        "SchedulerParameters=bf_interval=1,batch_sched_delay=0,sched_min_interval=0,sched_interval=1",
        "SlurmdTimeout=30",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={c.log_dir / 'jobcomp.txt'}",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        *(f"NodeName={h} NodeAddr={c.addr[h]} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
          for h in c.hosts),
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
