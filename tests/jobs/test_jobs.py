"""Job scripts: syntax, and the exact launcher command lines rendered under fake Slurm/PBS allocations.

Each expected command is written out here from the scheduler's description (4 Slurm nodes of 8 GPUs,
a PBS node file listing each host once per rank), not produced by the code under test.
"""
import subprocess

import pytest

from tests.jobs._fakes import JOBS, LOCAL, PBS, REPO_ROOT, SBATCH, FakeCluster, dry_run, run_script

SLURM_HOSTS = "node01:8,node02:8,node03:8,node04:8"


@pytest.fixture
def cluster(tmp_path):
    return FakeCluster(tmp_path)


def _slurm_env(cluster, **extra):
    return cluster.env(SLURM_JOB_NODELIST="node[01-04]", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64",
                       **extra)


def _train(cluster, *sets, python="python"):
    return [python, "-m", "hvd_megdet.train", "--config", str(cluster.config), "--set",
            f"data.train_path={cluster.data}", f"train.output_dir={cluster.output}", *sets]


def test_every_script_parses():
    scripts = sorted(p for p in JOBS.rglob("*") if p.suffix in {".sh", ".sbatch", ".pbs"})
    names = {p.relative_to(JOBS).as_posix() for p in scripts}
    assert {"slurm/megdet.sbatch", "pbs/megdet.pbs", "local/run.sh", "lib/launch.sh", "lib/hosts.sh", "lib/stop.sh",
            "lib/stage_data.sh", "submit_table3.sh", "env.sh"} <= names
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_slurm_horovodrun(cluster):
    cmds = dry_run(SBATCH, _slurm_env(cluster), "train.max_iters=5")
    assert cmds == [["horovodrun", "-np", "32", "-H", SLURM_HOSTS, *_train(cluster, "train.max_iters=5")]]


def test_slurm_mpirun_passes_the_environment_ranks_need(cluster):
    env = _slurm_env(cluster, LAUNCHER="mpirun", NCCL_DEBUG="INFO", UCX_TLS="rc,sm", MPIRUN="/opt/ompi/bin/mpirun")
    assert dry_run(SBATCH, env) == [[
        "/opt/ompi/bin/mpirun", "-np", "32", "-H", SLURM_HOSTS, "-bind-to", "none", "-map-by", "slot",
        "-mca", "pml", "ob1", "-mca", "btl", "^openib",
        "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "HDF5_USE_FILE_LOCKING",
        "-x", "NCCL_DEBUG", "-x", "UCX_TLS", *_train(cluster)]]


def test_slurm_srun_pmix(cluster):
    env = _slurm_env(cluster, LAUNCHER="srun", PYTHON="/envs/megdet/bin/python", SRUN_ARGS="--exclusive")
    assert dry_run(SBATCH, env) == [[
        "srun", "--mpi=pmix", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--cpu-bind=none",
        "--kill-on-bad-exit=1", "--exclusive", *_train(cluster, python="/envs/megdet/bin/python")]]


def test_slurm_ranks_per_node_from_ntasks_and_override(cluster):
    env = _slurm_env(cluster, SLURM_NTASKS_PER_NODE="4(x4)")
    del env["SLURM_GPUS_ON_NODE"]
    assert dry_run(SBATCH, env)[0][:5] == ["horovodrun", "-np", "16", "-H", SLURM_HOSTS.replace(":8", ":4")]
    env["GPUS_PER_NODE"] = "2"
    assert dry_run(SBATCH, env)[0][:5] == ["horovodrun", "-np", "8", "-H", SLURM_HOSTS.replace(":8", ":2")]


def test_slurm_without_scontrol_expands_the_hostlist_itself(cluster):
    env = cluster.env(SLURM_JOB_NODELIST="gpu[08-10],login", GPUS_PER_NODE="2", SCONTROL="/nonexistent/scontrol")
    assert dry_run(SBATCH, env)[0][:5] == ["horovodrun", "-np", "8", "-H", "gpu08:2,gpu09:2,gpu10:2,login:2"]


def test_slurm_outside_an_allocation_fails_clearly(cluster):
    proc = run_script(SBATCH, {**cluster.env(), "MEGDET_DRY_RUN": "1"})
    assert proc.returncode == 1 and "SLURM_JOB_NODELIST is not set" in proc.stderr


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_pbs_nodefile_with_repeated_hosts(cluster, launcher):
    # Interleaved on purpose: hosts keep the order of first appearance, counts are per host.
    nodefile = cluster.nodefile(["cn7", "cn7", "cn3", "cn7", "cn3", "", "cn3", "cn7", "cn3"])
    cmd = dry_run(PBS, cluster.env(PBS_NODEFILE=str(nodefile), LAUNCHER=launcher, NCPUS="16"))[0]
    assert cmd[:5] == [launcher, "-np", "8", "-H", "cn7:4,cn3:4"]
    assert cmd[-len(_train(cluster)):] == _train(cluster)


def test_pbs_gpus_per_node_overrides_the_nodefile(cluster):
    nodefile = cluster.nodefile(["a", "b", "c"])  # mpiprocs=1: one line per host
    cmd = dry_run(PBS, cluster.env(PBS_NODEFILE=str(nodefile), GPUS_PER_NODE="4"))[0]
    assert cmd == ["horovodrun", "-np", "12", "-H", "a:4,b:4,c:4", *_train(cluster)]


def test_pbs_rejects_srun_and_a_missing_nodefile(cluster):
    nodefile = cluster.nodefile(["a", "a"])
    proc = run_script(PBS, {**cluster.env(PBS_NODEFILE=str(nodefile), LAUNCHER="srun"), "MEGDET_DRY_RUN": "1"})
    assert proc.returncode == 1 and "LAUNCHER=srun needs a Slurm job" in proc.stderr
    proc = run_script(PBS, {**cluster.env(PBS_NODEFILE="/nonexistent/nodes"), "MEGDET_DRY_RUN": "1"})
    assert proc.returncode == 1 and "/nonexistent/nodes" in proc.stderr


def test_overrides_in_order_env_then_arguments(cluster, tmp_path):
    val = FakeCluster.make_shards(tmp_path / "val")
    env = _slurm_env(cluster, VAL_PATH=str(val), IMAGES_PER_GPU="2", BN_GROUP_SIZE="4",
                     EXTRA_SETS="solver.base_lr=0.5  train.log_every=1")
    cmd = dry_run(SBATCH, env, "train.max_iters=3", "train.output_dir=/elsewhere")[0]
    assert cmd[cmd.index("--set") + 1:] == [
        f"data.train_path={cluster.data}", f"data.val_path={val}", f"train.output_dir={cluster.output}",
        "data.images_per_rank=2", "model.bn_group_size=4", "solver.base_lr=0.5", "train.log_every=1",
        "train.max_iters=3", "train.output_dir=/elsewhere"]


def test_defaults_without_data_path_or_output_dir(cluster, tmp_path):
    env = _slurm_env(cluster, OUTPUT_ROOT=str(tmp_path / "runs"))
    del env["DATA_PATH"], env["OUTPUT_DIR"]
    cmd = dry_run(SBATCH, env)[0]
    assert cmd[cmd.index("--set"):] == ["--set", f"train.output_dir={tmp_path}/runs/tiny"]


@pytest.mark.parametrize("extra, message", [
    ({"DATA_PATH": "/nonexistent/shards"}, "has no manifest.json"),
    ({"CONFIG": "/nonexistent/c.yaml"}, "config file '/nonexistent/c.yaml' not found"),
    ({"LAUNCHER": "pdsh"}, "LAUNCHER must be"),
])
def test_bad_settings_fail_before_launching(cluster, extra, message):
    proc = run_script(SBATCH, {**_slurm_env(cluster, **extra), "MEGDET_DRY_RUN": "1"})
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_argument_that_is_not_an_override_is_rejected(cluster):
    proc = run_script(SBATCH, {**_slurm_env(cluster), "MEGDET_DRY_RUN": "1"}, "max_iters")
    assert proc.returncode == 1 and "'max_iters' is not key=value" in proc.stderr


def test_stage_data_runs_once_per_node_then_trains_from_local_disk(cluster, tmp_path):
    scratch = tmp_path / "scratch"
    env = _slurm_env(cluster, STAGE_DATA="1", LOCAL_SCRATCH=str(scratch))
    stage, train = dry_run(SBATCH, env)
    local_copy = f"{scratch}/hvd_megdet/shards"
    assert stage == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "bash",
                     str(JOBS / "lib" / "stage_data.sh"), str(cluster.data), local_copy]
    assert f"data.train_path={local_copy}" in train
    nodefile = cluster.nodefile(["a", "a", "b", "b"])
    stage, _ = dry_run(PBS, cluster.env(PBS_NODEFILE=str(nodefile), STAGE_DATA="1", LOCAL_SCRATCH=str(scratch)))
    assert stage == ["mpirun", "-np", "2", "-H", "a:1,b:1", "-bind-to", "none", "bash",
                     str(JOBS / "lib" / "stage_data.sh"), str(cluster.data), local_copy]


def test_local_run_defaults_to_the_repository_venv(cluster):
    env = cluster.env(NP="2")
    cmd = dry_run(LOCAL, env, "train.max_iters=2")[0]
    venv = REPO_ROOT / ".venv" / "bin"
    horovodrun = str(venv / "horovodrun") if (venv / "horovodrun").exists() else "horovodrun"
    python = str(venv / "python") if (venv / "python").exists() else "python"
    assert cmd == [horovodrun, "-np", "2", "-H", "localhost:2", *_train(cluster, "train.max_iters=2", python=python)]
    cmd = dry_run(LOCAL, {**env, "NP": "3", "LAUNCHER": "mpirun", "MPIRUN_ARGS": "--oversubscribe"})[0]
    assert cmd[:9] == ["mpirun", "-np", "3", "-H", "localhost:3", "-bind-to", "none", "-map-by", "slot"]
    assert cmd[9] == "--oversubscribe"


def test_printed_commands_quote_like_shlex(cluster, tmp_path):
    odd = tmp_path / "it's a dir"
    cmd = dry_run(SBATCH, _slurm_env(cluster, OUTPUT_DIR=str(odd)), "train.name=a b;c")[0]
    assert cmd[-2:] == [f"train.output_dir={odd}", "train.name=a b;c"]
