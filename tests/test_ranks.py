"""hvd_megdet.ranks: launcher detection for every launcher users run, and the one item split."""
import pytest

from hvd_megdet.ranks import Launch, detect_launch, split


@pytest.mark.parametrize("env, expected", [
    ({}, Launch("none", 1, 0)),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, Launch("openmpi", 4, 3)),
    ({"PMI_SIZE": "8", "PMI_RANK": "5"}, Launch("mpich", 8, 5)),  # MPICH/Intel MPI Hydra, Cray PMI
    # srun: a task of a job step has SLURM_STEP_ID; the batch script (no step) is not a rank.
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "7", "SLURM_STEP_ID": "0"}, Launch("slurm", 16, 7)),
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_ID": "12"}, Launch("none", 1, 0)),
    # srun --mpi=pmix: PMIx rank with Slurm's size; Open MPI's variables win when both are there.
    ({"PMIX_RANK": "2", "SLURM_NTASKS": "4"}, Launch("pmix", 4, 2)),
    ({"PMIX_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}, Launch("openmpi", 4, 2)),
    # horovodrun --gloo exports only Horovod's; horovodrun over MPI is mpirun underneath.
    ({"HOROVOD_SIZE": "2", "HOROVOD_RANK": "1"}, Launch("horovodrun-gloo", 2, 1)),
    ({"HOROVOD_SIZE": "2", "HOROVOD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
     Launch("openmpi", 2, 1)),
    # PBS: mpiexec of the site's MPI; the PBS job variables alone do not make a rank.
    ({"PBS_JOBID": "1.server", "PBS_NODEFILE": "/x", "PMI_SIZE": "2", "PMI_RANK": "0"}, Launch("mpich", 2, 0)),
    ({"PBS_JOBID": "1.server", "PBS_NODEFILE": "/x"}, Launch("none", 1, 0)),
])
def test_detect_launch(env, expected):
    assert detect_launch(env) == expected


def test_only_gloo_is_not_an_mpi_world():
    assert [Launch(n, 2, 0).uses_mpi for n in ("openmpi", "mpich", "slurm", "pmix", "horovodrun-gloo")] == \
        [True, True, True, True, False]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 10, 30, 31])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_split_is_disjoint_covering_in_order_and_balanced(n, size):
    shares = [split(n, r, size) for r in range(size)]
    assert [i for s in shares for i in s] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_split_examples_and_errors():
    assert [list(split(10, r, 3)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert list(split(2, 3, 4)) == []  # more ranks than items: some get nothing, none get a repeat
    for bad in [(5, 3, 3), (5, -1, 3), (5, 0, 0), (-1, 0, 1)]:
        with pytest.raises(ValueError):
            split(*bad)
