"""The documentation runs as written: its marked shell blocks, and its relative links.

A fenced block whose info string is ``bash run`` is one a user is meant to run on this machine
(docs/testing.md says which are not). The blocks run in order, README.md first and then docs/*.md by
name, in one scratch directory: a later block sees what an earlier one wrote, so the README tour's
shards and its one short training run serve every block after it. Each block is bash, run with
``-euo pipefail``, the venv's ``python`` first on PATH, and a few substitutions that keep it small
(``SMALL``). The scratch directory maps the demo's directories (data/synthetic, runs/demo) onto the
tour's, so the blocks that name what ``make demo`` leaves run on the tour's run instead.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "bash run"
# Fewer than this many marked blocks means a mark was lost in an edit (README tour 4, training 1,
# after training 1, planning 3): raise it when you mark more.
MIN_RUNNABLE = 9
# What the tests run instead of what the docs say, so that the whole file takes about a minute and a
# half on 2 cores: 8 images per synthetic split, 1 training iteration, and so the last checkpoint is
# number 1 whatever a block names.
SMALL = [
    (re.compile(r"--images \d+"), "--images 8"),
    (re.compile(r"train\.max_iters=\d+"), "train.max_iters=1"),
    (re.compile(r"ckpt_\d{8}\.pt"), "ckpt_00000001.pt"),
]
# Read by the blocks by relative path; everything they write stays in the scratch directory.
SHARED = ("configs", "jobs", "scripts", "benchmarks")
BLOCK_TIMEOUT_S = 300

_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(info string, line of the opening fence, body) of every fenced block in ``path``."""
    text = path.read_text()
    return [(m["info"].strip(), text.count("\n", 0, m.start()) + 1, m["body"]) for m in _FENCE.finditer(text)]


def runnable_blocks() -> list[tuple[str, str]]:
    """("file:line", body) of every marked block, in the order they run."""
    return [(f"{path.relative_to(ROOT)}:{line}", body) for path in DOC_FILES
            for info, line, body in fenced_blocks(path) if info == RUN_MARK]


def small(body: str) -> str:
    for pattern, replacement in SMALL:
        body = pattern.sub(replacement, body)
    return body


BLOCKS = runnable_blocks()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> dict:
    """The directory the blocks run in, their environment, and which blocks have run (by index)."""
    work = tmp_path_factory.mktemp("docs")
    for name in SHARED:
        (work / name).symlink_to(ROOT / name)
    for demo, tour in (("data/synthetic", "tour"), ("runs/demo", "tour")):  # dangling until the tour fills them
        (work / demo).parent.mkdir(parents=True, exist_ok=True)
        (work / demo).symlink_to(tour)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # hvd_megdet and data_prep come from the venv's editable install
    return {"work": work, "env": env, "done": {}}


def _run(scratch: dict, index: int) -> subprocess.CompletedProcess:
    where, body = BLOCKS[index]
    return subprocess.run(["bash", "-euo", "pipefail", "-c", small(body)], cwd=scratch["work"], env=scratch["env"],
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[where for where, _ in BLOCKS])
def test_marked_block_runs(scratch, index):
    done = scratch["done"]
    for earlier in range(index):  # a block selected alone (-k) still gets what the blocks before it wrote
        if earlier not in done:
            done[earlier] = _run(scratch, earlier).returncode
        if done[earlier] != 0:
            pytest.fail(f"an earlier block failed: {BLOCKS[earlier][0]}")
    proc = _run(scratch, index)
    done[index] = proc.returncode
    assert proc.returncode == 0, (f"{BLOCKS[index][0]} exited {proc.returncode}\n--- ran:\n{small(BLOCKS[index][1])}"
                                  f"--- stdout (end):\n{proc.stdout[-3000:]}\n--- stderr (end):\n{proc.stderr[-3000:]}")


def test_enough_blocks_are_marked_and_every_mark_is_spelled_alike():
    assert len(BLOCKS) >= MIN_RUNNABLE, [where for where, _ in BLOCKS]
    assert sum(where.startswith("README.md:") for where, _ in BLOCKS) >= 4  # the tour
    # A misspelt mark ("bash  run", "sh run", "run") would silently drop a block from the run above.
    odd = [f"{path.relative_to(ROOT)}:{line}: {info!r}" for path in DOC_FILES
           for info, line, _ in fenced_blocks(path) if "run" in info.split() and info != RUN_MARK]
    assert not odd
    # and the substitutions still find what they shrink
    text = "".join(body for _, body in BLOCKS)
    for pattern, _ in SMALL:
        assert pattern.search(text), pattern.pattern


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``: lower case, spaces to '-', punctuation dropped."""
    text = _FENCE.sub("", path.read_text())
    headings = re.findall(r"^#+\s+(.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_relative_links_point_at_existing_files(path):
    text = _INLINE_CODE.sub("", _FENCE.sub("", path.read_text()))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading '#{anchor}' in {resolved.name}")
    assert not broken, broken
