"""hvd_megdet.metrics: JSON lines on rank 0 only, and progress that reads well where it is shown."""
import fcntl
import io
import json
import logging
import os
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from hvd_megdet.metrics import (MetricLogger, NoProgress, ProgressBar, ProgressState, ProgressLines, read_log,
                                resolve_style)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def console():
    """What the hvd_megdet logger prints, as a list of messages (whatever handlers earlier tests left)."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    log = logging.getLogger("hvd_megdet")
    handler, level = Collect(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield messages
    log.removeHandler(handler)
    log.setLevel(level)


class FakeTime:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_only_rank_zero_writes_json_lines(tmp_path):
    MetricLogger(tmp_path / "r1", enabled=False).log("train", {"iter": 1, "loss": 2.0})
    assert not (tmp_path / "r1").exists()
    logger = MetricLogger(tmp_path / "r0", enabled=True, progress=False)
    logger.log("train", {"iter": 1, "loss": 2.0, "lr": 0.01})
    logger.log("eval", {"epoch": 1, "mmAP": 0.5})
    lines = (tmp_path / "r0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["type"] for l in lines] == ["train", "eval"]
    assert read_log(tmp_path / "r0" / "log.jsonl", "eval")[0]["mmAP"] == 0.5


def test_read_log_skips_a_cut_last_line_and_names_a_bad_middle_one(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"type": "train", "iter": 1}\n{"type": "train", "iter": 2}\n{"type": "tra')
    assert [r["iter"] for r in read_log(path)] == [1, 2]  # a writer killed mid-line
    path.write_text('{"type": "train", "iter": 1}\nnot json\n{"type": "train", "iter": 3}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON record"):
        read_log(path)


def test_progress_lines_every_n_iterations_with_eta_and_fields(console):
    now = FakeTime()
    bar = ProgressLines(total=100, initial=0, interval_s=0, every=25, now=now)
    for i in range(100):
        now.t += 2.0  # 2 s per iteration
        bar.update(1, epoch=i // 10 + 1, loss=1.0 / (i + 1), lr=0.02, img_per_s=8.0)
    # Printed at the first update, every 25 iterations after it, and at the end.
    assert [m.split(" ")[1] for m in console] == ["1/100", "26/100", "51/100", "76/100", "100/100"]
    assert console[1] == ("train 26/100 (26%) | epoch 3 | loss 0.03846 | lr 0.02 | 8.0 img/s | "
                          "0:00:52 elapsed, ETA 0:02:28")  # 74 iterations left at 2 s each
    assert console[-1].endswith("0:03:20 elapsed, ETA 0:00:00")


def test_progress_lines_by_time_and_a_shared_state_across_epochs(console):
    now, state = FakeTime(), ProgressState()
    # A resumed run (iteration 40 of 100) whose epochs are 20 iterations, one bar per epoch.
    for epoch_end in (60, 80, 100):
        bar = ProgressLines(total=100, initial=epoch_end - 20, interval_s=30.0, every=0, state=state, now=now)
        for i in range(20):
            now.t += 7.0
            bar.update(1, loss=epoch_end + 0.5) if i == 19 else bar.update(1)  # the loss of each epoch's end
        bar.close()
    # 7 s per iteration, a line once 30 s have passed since the last one: every 5th iteration.
    printed = [int(m.split(" ")[1].split("/")[0]) for m in console]
    assert printed == [41, 46, 51, 56, 61, 66, 71, 76, 81, 86, 91, 96, 100]
    # Elapsed since the run's first bar; the speed since its first update (40 its in 280 s), not this epoch's.
    assert console[printed.index(81)].endswith("0:04:47 elapsed, ETA 0:02:13")  # 19 left at 7 s
    assert console[0].endswith("0:00:07 elapsed, ETA ?")
    assert " | loss 60.5 | " in console[printed.index(61)]  # fields outlive the bar they were given to


def test_set_postfix_strings_and_tqdm_signature(console):
    now = FakeTime()
    bar = ProgressLines(total=10, interval_s=0, every=0, now=now)
    bar.set_postfix(loss="1.340", lr="0.012")  # what a loop written for tqdm passes
    bar.set_postfix({"img_s": 3.25}, refresh=False)
    bar.update(1)
    assert console == ["train 1/10 (10%) | loss 1.340 | lr 0.012 | 3.2 img/s | 0:00:00 elapsed, ETA ?"]


def test_resolve_style_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert resolve_style("auto", Tty()) == "bar"
    assert resolve_style("auto", io.StringIO()) == "lines"
    assert resolve_style("lines", Tty()) == "lines"
    with pytest.raises(ValueError, match="progress style"):
        resolve_style("fancy")


def test_logger_in_lines_style_leaves_train_records_to_the_progress_lines(tmp_path, console):
    logger = MetricLogger(tmp_path, enabled=True, progress=True, progress_style="lines")
    logger.log("train", {"iter": 5, "loss": 1.5})
    logger.log("checkpoint", {"iter": 5, "path": "x"})
    assert console == ["[checkpoint] iter=5 path=x"]
    assert len(read_log(tmp_path / "log.jsonl")) == 2  # both records in the log all the same
    assert isinstance(logger.progress_bar(total=50), ProgressLines)
    quiet = MetricLogger(tmp_path / "q", enabled=True, progress=False)
    quiet.log("train", {"iter": 5, "loss": 1.5})  # no progress: the records are the progress
    assert console[-1] == "[train] iter=5 loss=1.5"
    assert isinstance(quiet.progress_bar(total=50), NoProgress)
    assert isinstance(MetricLogger(tmp_path / "r1", enabled=False).progress_bar(total=50), NoProgress)


def test_logger_bar_style_is_tqdm(tmp_path):
    logger = MetricLogger(tmp_path, enabled=True, progress_style="bar")
    with logger.progress_bar(total=10) as bar:
        bar.update(1, loss=0.5)
    assert isinstance(bar, ProgressBar) and bar.bar.n == 1 and bar.fields == {"loss": 0.5}
    with logger.progress_bar(total=10, initial=1) as bar:  # the next epoch's bar shows the last loss
        assert bar.bar.postfix == "loss=0.5"


_SCRIPT = """
import sys, time
from hvd_megdet.metrics import MetricLogger, setup_console_logging
setup_console_logging(True)
logger = MetricLogger(sys.argv[1], enabled=True, progress=True)
logger.log("start", {"world_size": 2})
with logger.progress_bar(total=30) as bar:
    for i in range(30):
        bar.update(1, epoch=1, loss=0.5, lr=0.01, img_per_s=4.0)
print(type(bar).__name__, file=sys.stderr)
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100")


def test_a_pipe_gets_plain_lines_without_carriage_returns(tmp_path):
    """As under horovodrun/mpirun/srun: stderr is a pipe."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env=_env(), timeout=60, check=True)
    lines = proc.stderr.splitlines()
    assert "\r" not in proc.stderr and lines[-1] == "ProgressLines"
    progress = [l for l in lines if " INFO train " in l]
    # every = a tenth of 30: iterations 1, 4, 7, ..., 28 and the last.
    assert [l.split(" INFO train ")[1].split(" ")[0] for l in progress] == \
        [f"{i}/30" for i in (1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 30)]
    assert progress[-1].split(" INFO ")[1].startswith("train 30/30 (100%) | epoch 1 | loss 0.5 | lr 0.01 | 4.0 img/s")
    assert any("[start] world_size=2" in l for l in lines)


def test_a_terminal_gets_the_tqdm_bar(tmp_path):
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path)], stderr=follower,
                            stdout=subprocess.DEVNULL, env=_env())
    os.close(follower)
    output = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=60)
    os.close(leader)
    text = output.decode(errors="replace")
    assert "ProgressBar" in text and "\r" in text and "30/30" in text
    assert " INFO train " not in text
