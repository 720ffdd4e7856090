"""tests/cluster.py itself: a cluster starts beside running ones, and takes back the slot of one whose
test session was killed (CI once failed every multi-host test on a machine where a killed session's
cluster still held the addresses); its packages install while another installer holds dpkg's lock."""
import fcntl
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests import cluster_install, cluster_slots
from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]


def _netns(tag: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{tag}-")]


def test_a_cluster_starts_beside_a_running_one_and_takes_back_a_dead_ones_slot(cluster, capfd):
    # A cluster started by hand, whose process is then killed: its hosts run on (a SIGKILLed session).
    dead_root = Path(tempfile.mkdtemp(prefix="megdet-cluster-"))
    by_hand = subprocess.Popen([sys.executable, "-m", "tests.cluster", str(dead_root), "2"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = by_hand.stdout.readline()  # its first line says it is up; EOF if it failed
    assert "hosts up" in line, by_hand.stderr.read()
    dead_tag = re.search(r"slot (mgd\d+)", line).group(1)
    assert dead_tag != cluster.tag  # beside the session's cluster, in a slot of its own
    holders = [int((dead_root / "run" / f"{h}.pid").read_text()) for h in ("node01", "node02")]
    by_hand.kill()
    by_hand.wait()
    assert sorted(_netns(dead_tag)) == [f"{dead_tag}-node01", f"{dead_tag}-node02"]

    # The next cluster frees the dead owner's slot (every process of its hosts killed, its namespaces,
    # bridge and root removed, one line saying so), then starts: ssh and Slurm work on it.
    other = Cluster(Path(tempfile.mkdtemp(prefix="megdet-cluster-")), 2)
    other.start()
    tag = other.tag
    try:
        err = capfd.readouterr().err
        assert f"removed test cluster {dead_tag} left by a process that died" in err
        assert not any(Path(f"/proc/{pid}").exists() for pid in holders)
        assert not dead_root.exists()
        if other.tag != dead_tag:  # another worker took it first
            assert _netns(dead_tag) == [] and not Path(f"/sys/class/net/{dead_tag}br0").exists()
        assert other.subnet != cluster.subnet and other.subnet.subnet_of(cluster_slots.NETWORK)
        assert other.run("node01", ["ssh", "node02", "hostname"]).stdout.strip() == "node02"
    finally:
        other.stop()
        subprocess.run(["rm", "-rf", str(other.root)], check=True)
    # Stopping it removed its own slot only: the session's cluster still runs, its shared mounts in place.
    assert _netns(tag) == [] and not (cluster_slots.REGISTRY / f"{tag}.cluster").exists()
    assert not Path(f"/sys/class/net/{tag}br0").exists() and Path("/root/.ssh").is_dir()
    assert cluster.run("node01", ["ssh", "node02", "hostname"]).stdout.strip() == "node02"


def _apt_get_install_running() -> bool:
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"apt-get", b"install"]:
            return True
    return False


def test_an_install_waits_for_dpkg_held_by_another_installer():
    # On a fresh machine both test workers installed the cluster's packages at once, and the second
    # failed on dpkg's lock (every test of its cluster errored). Another program holding the lock
    # (unattended-upgrades, a user's apt) must not fail the tests either.
    done: list[BaseException | None] = []
    with open("/var/lib/dpkg/lock-frontend", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # what dpkg itself takes
        installer = threading.Thread(target=lambda: done.append(_try(cluster_install.apt_install, ["openssh-client"])))
        installer.start()
        deadline = time.monotonic() + 300
        while installer.is_alive() and not _apt_get_install_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        fcntl.lockf(lock, fcntl.LOCK_UN)
    installer.join(timeout=600)
    assert done == [None], done


def _try(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 (returned to the test's thread)
        return err
    return None
