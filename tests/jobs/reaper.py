"""A child subreaper on one host of the test cluster (tests/jobs/pbs_cluster.py starts one per host).

Every daemon it starts (and whatever they orphan) stays below it. Each line on stdin is {"argv", "env",
"log"}: run it in a session of its own, answer {"rc"} when it exits. At the end of stdin it SIGKILLs
everything still below it, reaps it, and exits.
"""
import ctypes
import json
import os
import select
import signal
import sys
import time

ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
signal.signal(signal.SIGTERM, signal.SIG_IGN)
me, waiting = os.getpid(), None


def reap():
    global waiting
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == waiting:
            print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
            waiting = None


def below_me():
    parent = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            pass
    found = set()
    for pid in parent:
        p = pid
        while p in parent and p not in (0, 1, me):
            p = parent[p]
        if p == me and pid != me:
            found.add(pid)
    return found


while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.2)
    reap()
    if not ready:
        continue
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    waiting = os.posix_spawnp(req["argv"][0], req["argv"], req["env"], setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0), (os.POSIX_SPAWN_DUP2, fd, 1),
        (os.POSIX_SPAWN_DUP2, fd, 2), (os.POSIX_SPAWN_CLOSE, fd)])
    os.close(fd)
for _ in range(50):
    pids = below_me()
    if not pids:
        break
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
    reap()
reap()
