"""jobs/lib/stage_data.sh: a complete copy of the shards on local disk, reused when already there."""
import filecmp
import subprocess

from tests.jobs._fakes import JOBS, FakeCluster

STAGE = JOBS / "lib" / "stage_data.sh"


def _stage(src, dst):
    return subprocess.run(["bash", str(STAGE), str(src), str(dst)], capture_output=True, text=True, timeout=60)


def _same_tree(a, b) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def test_copies_every_file_and_reuses_a_complete_copy(tmp_path):
    src = FakeCluster.make_shards(tmp_path / "shards")
    (src / "sub").mkdir()
    (src / "sub" / "part-1.h5").write_bytes(b"\x00\x01" * 1000)
    dst = tmp_path / "scratch" / "hvd_megdet" / "shards"

    proc = _stage(src, dst)
    assert proc.returncode == 0, proc.stderr
    assert _same_tree(src, dst)
    assert not list(dst.parent.glob("*.partial.*"))  # the temporary copy was renamed

    marker = dst / "marker"
    marker.write_text("this copy was reused")
    proc = _stage(src, dst)
    assert proc.returncode == 0 and "already a copy" in proc.stderr
    assert marker.exists()

    # Different shards (a new manifest) replace the stale copy entirely.
    (src / "manifest.json").write_text('{"shards": ["part-0.h5", "sub/part-1.h5"]}')
    assert _stage(src, dst).returncode == 0
    assert not marker.exists() and _same_tree(src, dst)


def test_a_source_without_manifest_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    proc = _stage(tmp_path / "src", tmp_path / "dst")
    assert proc.returncode == 1 and "has no manifest.json" in proc.stderr
    assert not (tmp_path / "dst").exists()


def test_usage():
    proc = subprocess.run(["bash", str(STAGE), "only-one"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
