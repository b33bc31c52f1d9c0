"""`serve.deploy.spawn`: Ctrl-C reaches the child even when the caller ignores SIGINT (CI, nohup, `cmd &`)."""

import os
import signal
import subprocess
import sys

from serve.deploy import spawn

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def test_ctrl_c_stops_a_child_of_a_caller_that_ignores_sigint():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job starts
    try:
        proc = spawn(SLEEPER, stdout=subprocess.PIPE)
        plain = subprocess.Popen(SLEEPER, stdout=subprocess.PIPE, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        for p in (proc, plain):
            assert p.stdout.readline().strip() == b"up"
            os.killpg(p.pid, signal.SIGINT)
        assert proc.wait(timeout=20) != 0  # KeyboardInterrupt ended it
        try:  # the control: Popen's default keeps SIGINT ignored, the child sleeps on
            plain.wait(timeout=2)
            raise AssertionError("a child that inherited SIG_IGN exited on SIGINT: the control is wrong")
        except subprocess.TimeoutExpired:
            pass
    finally:
        for p in (proc, plain):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
