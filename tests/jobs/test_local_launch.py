"""jobs/local/run.sh starts real Horovod ranks (horovodrun and mpirun), with a probe in place of train.

PYTHON points at a probe that initialises hvd_megdet.comm exactly as train.py does and writes what
each rank saw into the output directory named on its command line. This checks the launch chain
(run.sh -> launcher -> 2 processes -> one Horovod world) independently of the training code;
tests/jobs/test_local_run.py runs the real training.
"""
import json
import subprocess
import sys

import pytest

from tests.jobs._fakes import LOCAL, REPO_ROOT, FakeCluster

_PROBE = """#!/bin/bash
[ "$1" = -c ] && exec {python} "$@"  # the job's check before launching: python -c 'import ...'
exec {python} -c '
import json, os, sys
from hvd_megdet import comm
out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("train.output_dir="))
ctx = comm.init()
info = dict(rank=ctx.rank, size=ctx.size, host_size=ctx.host_size, argv=sys.argv[1:],
            omp=os.environ.get("OMP_NUM_THREADS"), hdf5=os.environ.get("HDF5_USE_FILE_LOCKING"))
with open(os.path.join(out, "rank%d.json" % ctx.rank), "w") as f:
    json.dump(info, f)
comm.shutdown(ctx)
' "$@"
"""


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_two_local_ranks_form_one_horovod_world(tmp_path, launcher):
    cluster = FakeCluster(tmp_path)
    probe = tmp_path / "probe.sh"
    probe.write_text(_PROBE.format(python=sys.executable))
    probe.chmod(0o755)
    env = cluster.env(NP="2", LAUNCHER=launcher, PYTHON=str(probe))
    env["PATH"] = f"{REPO_ROOT / '.venv' / 'bin'}:{env['PATH']}"
    proc = subprocess.run(["bash", str(LOCAL), "train.max_iters=2"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    ranks = [json.loads((cluster.output / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["size"], r["host_size"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    for r in ranks:
        assert r["argv"] == ["-m", "hvd_megdet.train", "--config", str(cluster.config), "--set",
                             f"data.train_path={cluster.data}", f"train.output_dir={cluster.output}",
                             "train.max_iters=2"]
        assert r["hdf5"] == "FALSE" and int(r["omp"]) >= 1
