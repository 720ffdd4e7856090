"""Fixtures of the job tests: shards for the jobs the test cluster runs (tests/cluster.py is the
session's `cluster` fixture, in tests/conftest.py), and PBS on that cluster."""
from pathlib import Path

import pytest

from data_prep import synthetic


@pytest.fixture(scope="session")
def slurm_shards(tmp_path_factory) -> Path:
    """128 synthetic 64x48 images: 32 iterations per epoch at 2 nodes x 2 ranks x 1 image, so that every
    job stops, saves and resumes inside the first epoch (no epoch-end checkpoint in between)."""
    return synthetic.make_shards(tmp_path_factory.mktemp("slurm_data"), 128, "64x48", seed=0)


# --- PBS (issue 20): a real OpenPBS on the hosts of the session's cluster (tests/jobs/pbs_cluster.py) ---
@pytest.fixture(scope="session")
def pbs(cluster):
    """Server, scheduler, comm and PostgreSQL on the cluster's head host, a MoM on every host, each with
    its own PBS_HOME and PBS_CONF_FILE; stopped by PID after the last test, the machine restored. Skipped
    only where OpenPBS is neither installed (/opt/pbs) nor available to extract (../shared/openpbs)."""
    from tests.jobs.pbs_cluster import ClusterPBS, PBSError, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    server = ClusterPBS(cluster)
    try:
        server.start()
        failure = None
    except PBSError as err:
        failure = str(err)
    if failure:
        pytest.fail(f"no PBS on the test cluster: {failure}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pbs_shards(pbs) -> Path:
    """64 synthetic 64x48 images where the job user can read them: 16 iterations per epoch at 2 hosts
    x 2 ranks x 1 image (the PBS jobs train 8, inside the first epoch)."""
    return synthetic.make_shards(pbs.workdir("data"), 64, "64x48", seed=0)
