"""The Table 3 sweep: the config list, each row's GPU count, array tasks and the submit helper."""
import subprocess

import pytest

from tests.jobs._fakes import JOBS, PBS, SBATCH, SUBMIT_TABLE3, FakeCluster, dry_run, run_script

# MegDet (arXiv 1711.07240) Table 3, in the paper's order: (config, # of GPUs). 2/4/8-image rows and
# the BN-size ablations on 8 GPUs are not part of the sweep.
PAPER_ROWS = [
    ("megdet_bs16_base_frozen.yaml", 8), ("megdet_bs16_bn16.yaml", 8), ("megdet_bs32_bn32.yaml", 8),
    ("megdet_bs64_bn32.yaml", 16), ("megdet_bs128_bn32.yaml", 32), ("megdet_bs256_bn32.yaml", 64),
    ("megdet_bs256_bn16.yaml", 128),
    ("megdet_bs16_bn16_long.yaml", 8), ("megdet_bs32_bn32_long.yaml", 8), ("megdet_bs64_bn32_long.yaml", 16),
    ("megdet_bs128_bn32_long.yaml", 32), ("megdet_bs256_bn32_long.yaml", 64), ("megdet_bs256_bn16_long.yaml", 128),
]


@pytest.fixture
def cluster(tmp_path):
    cluster = FakeCluster(tmp_path)
    (tmp_path / "configs").mkdir()
    for name, _ in PAPER_ROWS:
        (tmp_path / "configs" / name).write_text("# stand-in\n")
    return cluster


def test_config_list_is_table3_in_order():
    lines = (JOBS / "table3_configs.txt").read_text().splitlines()
    assert lines == [name for name, _ in PAPER_ROWS]


def test_gpu_count_of_every_row():
    names = " ".join(name for name, _ in PAPER_ROWS)
    script = f'source {JOBS}/lib/launch.sh; for n in {names} other.yaml; do echo "$n $(megdet_table3_gpus $n)"; done'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"{name} {gpus}" for name, gpus in PAPER_ROWS] + ["other.yaml "]


def test_slurm_array_task_picks_its_row(cluster, tmp_path):
    # Row 3 (64 images, BN 32) ran on 16 GPUs: here 4 nodes x 4.
    env = cluster.env(SLURM_JOB_NODELIST="node[01-04]", GPUS_PER_NODE="4", SLURM_ARRAY_TASK_ID="3",
                      CONFIG_DIR=str(tmp_path / "configs"), OUTPUT_ROOT=str(tmp_path / "runs"))
    del env["OUTPUT_DIR"]
    cmd = dry_run(SBATCH, env)[0]
    assert cmd[:5] == ["horovodrun", "-np", "16", "-H", "node01:4,node02:4,node03:4,node04:4"]
    assert cmd[cmd.index("--config") + 1] == f"{tmp_path}/configs/megdet_bs64_bn32.yaml"
    assert f"train.output_dir={tmp_path}/runs/megdet_bs64_bn32" in cmd


def test_pbs_array_index_and_config_index(cluster, tmp_path):
    nodefile = cluster.nodefile(["a"] * 8)
    env = cluster.env(PBS_NODEFILE=str(nodefile), PBS_ARRAY_INDEX="8", CONFIG_DIR=str(tmp_path / "configs"))
    cmd = dry_run(PBS, env)[0]
    assert cmd[cmd.index("--config") + 1] == f"{tmp_path}/configs/megdet_bs32_bn32_long.yaml"
    env = {**env, "CONFIG_INDEX": "01"}
    del env["PBS_ARRAY_INDEX"]
    cmd = dry_run(PBS, env)[0]
    assert cmd[cmd.index("--config") + 1] == f"{tmp_path}/configs/megdet_bs16_bn16.yaml"


def test_array_task_on_the_wrong_gpu_count_fails(cluster, tmp_path):
    env = cluster.env(SLURM_JOB_NODELIST="node[01-04]", GPUS_PER_NODE="4", SLURM_ARRAY_TASK_ID="5",
                      CONFIG_DIR=str(tmp_path / "configs"), MEGDET_DRY_RUN="1")
    proc = run_script(SBATCH, env)
    assert proc.returncode == 1
    assert "run on 64 GPUs, but this job has 16 ranks" in proc.stderr and "with 16 nodes" in proc.stderr
    # Outside the sweep the same mismatch is only a warning (a changed images-per-GPU may be intended).
    del env["SLURM_ARRAY_TASK_ID"]
    env["CONFIG"] = f"{tmp_path}/configs/megdet_bs256_bn32.yaml"
    proc = run_script(SBATCH, env)
    assert proc.returncode == 0 and "warning:" in proc.stderr


def test_array_index_past_the_list_fails(cluster, tmp_path):
    env = cluster.env(SLURM_JOB_NODELIST="gpu1", SLURM_ARRAY_TASK_ID="13", MEGDET_DRY_RUN="1")
    proc = run_script(SBATCH, env)
    assert proc.returncode == 1 and "outside the 13 configs" in proc.stderr


def test_submit_slurm_one_array_per_gpu_count():
    cmds = dry_run(SUBMIT_TABLE3, {"PATH": "/usr/bin:/bin"}, "slurm", "--partition=gpu")
    sbatch = str(JOBS / "slurm" / "megdet.sbatch")
    common = ["--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", sbatch]
    assert cmds == [
        ["sbatch", "--array=0,1,2,7,8", "--nodes=1", *common],
        ["sbatch", "--array=3,9", "--nodes=2", *common],
        ["sbatch", "--array=4,10", "--nodes=4", *common],
        ["sbatch", "--array=5,11", "--nodes=8", *common],
        ["sbatch", "--array=6,12", "--nodes=16", *common],
    ]
    # Every row is submitted exactly once, on GPUs = nodes x 8 = the paper's count.
    rows = {int(i): int(c[2].split("=")[1]) * 8 for c in cmds for i in c[1].split("=")[1].split(",")}
    assert rows == {i: gpus for i, (_, gpus) in enumerate(PAPER_ROWS)}


def test_submit_pbs_one_job_per_row_with_four_gpu_nodes():
    cmds = dry_run(SUBMIT_TABLE3, {"PATH": "/usr/bin:/bin", "GPUS_PER_NODE": "4", "CPUS_PER_NODE": "32"}, "pbs")
    pbs = str(JOBS / "pbs" / "megdet.pbs")
    assert cmds == [["qsub", "-N", f"megdet_t3_{i}", "-v", f"CONFIG_INDEX={i}",
                     "-l", f"select={gpus // 4}:ncpus=32:ngpus=4:mpiprocs=4", pbs]
                    for i, (_, gpus) in enumerate(PAPER_ROWS)]


def test_submit_rejects_unknown_rows_and_schedulers(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nmegdet_bs16_bn16.yaml\n\nmy_experiment.yaml\n")
    proc = run_script(SUBMIT_TABLE3, {"PATH": "/usr/bin:/bin", "CONFIG_LIST": str(listing), "MEGDET_DRY_RUN": "1"},
                      "slurm")
    assert proc.returncode == 1 and "my_experiment.yaml (row 1 of" in proc.stderr
    proc = run_script(SUBMIT_TABLE3, {"PATH": "/usr/bin:/bin"}, "lsf")
    assert proc.returncode == 2 and "usage" in proc.stderr
