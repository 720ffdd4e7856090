"""Job scripts run for real around a stub launcher: environment, exit status, requeue and TERM handling."""
import os
import signal
import subprocess
import time

import pytest

from tests.jobs._fakes import PBS, REPO_ROOT, SBATCH, FakeCluster, run_script


@pytest.fixture
def cluster(tmp_path):
    return FakeCluster(tmp_path)


def _slurm_env(cluster, **extra):
    return cluster.env(SLURM_JOB_NODELIST="node[01-04]", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64",
                       SLURM_JOB_ID="4242", HOROVODRUN=str(cluster.launcher), **extra)


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start(script, env):
    return subprocess.Popen(["bash", str(script)], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, err


def test_launcher_gets_its_arguments_and_the_hpc_environment(cluster):
    proc = run_script(SBATCH, _slurm_env(cluster, FAKE_EXIT="0"), "train.max_iters=2")
    assert proc.returncode == 0, proc.stderr
    assert cluster.launcher_argv() == [
        "-np", "32", "-H", "node01:8,node02:8,node03:8,node04:8", "python", "-m", "hvd_megdet.train",
        "--config", str(cluster.config), "--set", f"data.train_path={cluster.data}",
        f"train.output_dir={cluster.output}", "train.max_iters=2"]
    env = cluster.launcher_env()
    assert env["OMP_NUM_THREADS"] == "8"  # 64 CPUs / 8 ranks per node
    assert env["HDF5_USE_FILE_LOCKING"] == "FALSE"
    # Open MPI's daemons wait this long before killing ranks that are saving on a stop (STOP_GRACE).
    assert env["OMPI_MCA_odls_base_sigkill_timeout"] == "120"
    assert env["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)
    assert cluster.output.is_dir()


def test_user_settings_win_over_defaults(cluster):
    env = _slurm_env(cluster, FAKE_EXIT="0", THREADS_PER_RANK="3", HDF5_USE_FILE_LOCKING="TRUE", PYTHONPATH="/x",
                     STOP_GRACE="45")
    assert run_script(SBATCH, env).returncode == 0
    got = cluster.launcher_env()
    assert (got["OMP_NUM_THREADS"], got["HDF5_USE_FILE_LOCKING"], got["PYTHONPATH"]) == ("3", "TRUE", f"{REPO_ROOT}:/x")
    assert got["OMPI_MCA_odls_base_sigkill_timeout"] == "45"


def test_launcher_exit_status_is_the_job_exit_status(cluster):
    proc = run_script(SBATCH, _slurm_env(cluster, FAKE_EXIT="3"))
    assert proc.returncode == 3
    assert cluster.scontrol_log.exists() is False  # a failed run is not requeued


def test_slurm_usr1_stops_the_ranks_then_requeues_the_job(cluster):
    cluster.output.mkdir()
    (cluster.output / "STOP").write_text("a request meant for an earlier run\n")
    proc = _start(SBATCH, _slurm_env(cluster, SLURM_RESTART_COUNT="2"))
    _wait_for(lambda: "started" in cluster.launcher_events(), "the launcher to start")
    os.kill(proc.pid, signal.SIGUSR1)
    rc, err = _finish(proc)
    # The stale request was removed before launching; the USR1 became the stop file, which the ranks
    # (the stand-in) saw; the job was requeued only once they had ended, and the launcher got no TERM.
    assert cluster.launcher_events() == ["started", "STOP USR1"]
    assert cluster.scontrol_log.read_text().splitlines() == ["requeue 4242"]
    assert rc == 143 and "requeueing job 4242 (restart 3)" in err
    assert err.index("training stopped on request") < err.index("requeueing job")


def test_slurm_usr1_past_max_requeues_only_stops(cluster):
    proc = _start(SBATCH, _slurm_env(cluster, SLURM_RESTART_COUNT="5", MAX_REQUEUES="5"))
    _wait_for(lambda: "started" in cluster.launcher_events(), "the launcher to start")
    os.kill(proc.pid, signal.SIGUSR1)
    rc, err = _finish(proc)
    assert not cluster.scontrol_log.exists()
    assert cluster.launcher_events() == ["started", "STOP USR1"] and "not requeueing" in err


def test_pbs_term_becomes_the_stop_file(cluster):
    nodefile = cluster.nodefile(["a", "a"])
    proc = _start(PBS, cluster.env(PBS_NODEFILE=str(nodefile), LAUNCHER="mpirun", MPIRUN=str(cluster.launcher)))
    _wait_for(lambda: "started" in cluster.launcher_events(), "the launcher to start")
    os.kill(proc.pid, signal.SIGTERM)
    rc, _ = _finish(proc)
    assert cluster.launcher_events() == ["started", "STOP TERM"]
    assert rc == 143
    assert cluster.launcher_argv()[:4] == ["-np", "2", "-H", "a:2"]
