"""Shared fixtures: a small synthetic COCO split packed into shards by the real data_prep commands."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from data_prep import synthetic

# Tests start more MPI ranks than this machine has cores: a rank waiting in MPI yields its core (Open MPI
# does so by itself only when told it oversubscribes). Every launcher a test starts inherits it.
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


# `make test` runs two pytest-xdist workers, a file at a time each (--dist loadfile --no-loadscope-reorder):
# the longest files go first, so that neither worker is left running one of them alone at the end.
SLOW_FIRST = ("tests/jobs/test_slurm.py", "tests/jobs/test_pbs.py", "tests/test_train.py", "tests/jobs/test_hosts.py",
              "tests/test_evaluate.py", "tests/test_train_loop.py")


def pytest_collection_modifyitems(items):
    def order(item) -> int:
        path = item.nodeid.split("::")[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=order)  # stable: the order within a file is kept


@pytest.fixture(scope="session")
def tiny_train_shards(tmp_path_factory) -> Path:
    """16 images of 128x96 (some portrait), 5 classes with non-contiguous COCO ids."""
    return synthetic.make_shards(tmp_path_factory.mktemp("tiny_train"), 16, "128x96", seed=3)


@pytest.fixture(scope="session")
def cluster():
    """Two hosts of tests/cluster.py (node01, node02: network namespaces with their own hostname and
    address, sshd, slurmd; slurmctld and munged on node01), one for the whole test session, stopped by
    PID afterwards. Skipped, with the reason, only where namespaces cannot be made (not root); on CI,
    which runs as root, a cluster that cannot start fails the tests that need it."""
    from tests.cluster import Cluster, ClusterError, why_unavailable

    reason = why_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"no test cluster on CI: {reason}", pytrace=False)
        pytest.skip(f"no test cluster here: {reason}")
    # Under /tmp, not pytest's 0700 temporary directory: munged wants its socket's directories open. Each
    # pytest-xdist worker gets a cluster of its own, in a free slot of the test range (tests/cluster_slots.py).
    root = Path(tempfile.mkdtemp(prefix="megdet-cluster-"))
    hosts = Cluster(root, 2)
    try:
        hosts.start()
    except ClusterError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"the test cluster did not start: {err}", pytrace=False)
    yield hosts
    hosts.stop()
    if os.environ.get("MEGDET_CLUSTER_LOGS"):  # where to keep the daemons' logs (debugging a job test)
        shutil.copytree(root / "log", os.environ["MEGDET_CLUSTER_LOGS"], dirs_exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
