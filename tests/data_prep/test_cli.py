"""hvd-megdet-prep / python -m data_prep dispatch to each command's main."""
import subprocess
import sys

from data_prep import cli
from tests.mpirun import REPO_ROOT


def test_dispatch(tmp_path, capsys):
    assert cli.main(["synthetic", "--out", str(tmp_path / "s"), "--images", "3", "--size", "48x32"]) == 0
    assert cli.main(["coco-to-hdf5", "--images", str(tmp_path / "s" / "images"), "--annotations",
                     str(tmp_path / "s" / "annotations" / "instances_train.json"), "--out", str(tmp_path / "h5")]) == 0
    assert cli.main(["verify", str(tmp_path / "h5")]) == 0
    assert "all good" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2 and "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "manifest.json" in proc.stderr


def test_packing_does_not_import_torch():
    # data_prep needs only hvd_megdet.data.h5_schema; torch would cost every packing rank seconds.
    code = "import sys, data_prep.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=60).returncode == 0
