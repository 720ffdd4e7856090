"""A real single-node Slurm cluster (tests/jobs/slurm_cluster.py) for the tests that submit jobs."""
from pathlib import Path

import pytest

from tests.conftest import make_synthetic_shards
from tests.jobs.slurm_cluster import LocalSlurm, SlurmError


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> LocalSlurm:
    """munged, slurmctld and slurmd of this machine, installed from apt when missing; stopped (by the
    PIDs started here) after the last test. A machine that cannot run them fails the tests, naming why."""
    cluster = LocalSlurm(Path(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        failure = None
    except SlurmError as err:
        failure = str(err)
    if failure:
        pytest.fail(f"no Slurm cluster for the job tests: {failure}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_shards(tmp_path_factory) -> Path:
    """64 synthetic 64x48 images: 32 iterations per epoch at 2 ranks x 1 image, so that every test
    stops, saves and resumes inside the first epoch (no epoch-end checkpoint in between)."""
    return make_synthetic_shards(tmp_path_factory.mktemp("slurm_data"), 64, "64x48", seed=0)
