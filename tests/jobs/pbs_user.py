"""The ordinary user the PBS test jobs run as (tests/jobs/pbs_cluster.py): the MoM does not track root's jobs.

Made when missing, with its home in the PBS cluster's private directory, the cluster's key and an ssh
config of its own (mpirun and horovodrun reach the other hosts as that user), and PBS's commands on its
login PATH. The cluster's files it must read are opened to it (o+x on the directories above, o+r on the
file) and get their old modes back in ``remove()``, which also kills what the user left on the hosts.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from tests import cluster_slots
from tests.cluster import Cluster
from tests.jobs.pbs_install import PBS_EXEC, PBSError

NAME = "megdet"
REPO_ROOT = Path(__file__).resolve().parents[2]


class JobUser:
    def __init__(self, cluster: Cluster, name: str = NAME):
        self.cluster, self.name = cluster, name
        self.made = False
        self.modes: dict[Path, int] = {}  # cluster paths opened to the user: their old modes

    @property
    def home(self) -> Path:
        return Path(pwd.getpwnam(self.name).pw_dir)

    def make(self, private: Path) -> None:
        """The user, made when missing with its home below ``private``, ready to ssh between the hosts."""
        try:
            home = Path(pwd.getpwnam(self.name).pw_dir)
            if home.parent.parent.name.startswith("hvd_megdet-pbs-") and not home.parent.parent.exists():
                # Made by a test session that was killed: the next cluster removed its private directory
                # (tests/cluster_slots.py), and its home with it.
                _run(["userdel", "--force", self.name])
                raise KeyError(self.name)
        except KeyError:
            # '*': no password, but not locked (sshd without PAM refuses a locked account's keys too)
            _run(["useradd", "--create-home", "--home-dir", str(private / "home" / self.name),
                  "--shell", "/bin/bash", "--user-group", "--password", "*", self.name])
            self.made = True
            (private / "home").chmod(0o755)
        user = pwd.getpwnam(self.name)
        home = Path(user.pw_dir)
        home.mkdir(parents=True, exist_ok=True)
        ssh = home / ".ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(self.cluster.ssh_key, ssh / "id_ed25519")
        shutil.copy(self.cluster.ssh_key.with_suffix(".pub"), ssh / "id_ed25519.pub")
        (ssh / "config").write_text("\n".join([
            "Host *", f"  IdentityFile {ssh / 'id_ed25519'}", "  IdentitiesOnly yes", "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", "  BatchMode yes", "  ConnectTimeout 10", ""]))
        # A job runs in a login shell: what /etc/profile.d/pbs.sh does on a PBS site (qstat in the job).
        profile = home / ".profile"
        text = profile.read_text() if profile.exists() else ""
        if f"{PBS_EXEC / 'bin'}:" not in text:
            profile.write_text(text + f"\n# PBS's commands, as /etc/profile.d/pbs.sh puts them on a site\n"
                                      f"PATH={PBS_EXEC / 'bin'}:$PATH\n")
        for path in (home, profile, ssh, *ssh.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        (ssh / "id_ed25519").chmod(0o600)
        # sshd opens AuthorizedKeysFile (the cluster's, for every user) with the user's rights, and the
        # repository's venv may point at an interpreter below /root.
        self.let_read(self.cluster.ssh_dir / "authorized_keys")
        venv_python = REPO_ROOT / ".venv" / "bin" / "python"
        self.let_read(Path(os.path.realpath(venv_python if venv_python.exists() else sys.executable)))

    def let_read(self, path: Path) -> None:
        """o+x on every directory above ``path``, o+r on it (the old modes come back in ``remove()``)."""
        for part in [*reversed(path.parents), path]:
            mode = part.stat().st_mode & 0o7777
            want = mode | (0o004 if part == path else 0o001)
            if want != mode:
                self.modes.setdefault(part, mode)
                part.chmod(want)

    def own(self, path: Path) -> None:
        user = pwd.getpwnam(self.name)
        os.chown(path, user.pw_uid, user.pw_gid)

    def kill_processes(self) -> None:
        """The user's processes on the cluster's hosts (ranks that sshd started, not the MoM)."""
        try:
            uid = pwd.getpwnam(self.name).pw_uid
        except KeyError:
            return
        cluster_slots.kill_until_gone(lambda: [pid for host in self.cluster.hosts
                                               for pid in self.cluster.processes(host) if _uid(pid) == uid])

    def remove(self) -> None:
        """The old modes back on the cluster's files, and the user deleted if made here."""
        for path, mode in self.modes.items():
            if path.exists():
                path.chmod(mode)
        self.modes.clear()
        if self.made:
            _run(["userdel", "--force", self.name], check=False)  # zombies of its processes may remain
            self.made = False


def _uid(pid: int) -> int | None:
    """The owner of a live process (None for one gone or a zombie)."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None
        return os.stat(f"/proc/{pid}").st_uid
    except (OSError, IndexError):
        return None


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise PBSError(f"'{' '.join(argv)}' failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc
