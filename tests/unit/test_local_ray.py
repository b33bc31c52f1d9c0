"""`local_ray`: stopping the head waits for its processes, not for their zombies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from musiclora.local_ray import _group_alive


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()[0]


def test_a_process_group_of_zombies_has_stopped():
    """An unreaped child that exited is still found by killpg(pgid, 0); it must not count as running
    (`LocalRay.stop` then sat out its whole 30 s timeout on every stop)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pgid = os.getpgid(proc.pid)
        assert _group_alive(pgid)
        os.kill(proc.pid, signal.SIGTERM)
        for _ in range(100):  # until it has exited; not reaped, so a zombie
            if _state(proc.pid) == "Z":
                break
            time.sleep(0.05)
        assert _state(proc.pid) == "Z"
        os.killpg(pgid, 0)  # the zombie is still in the group ...
        assert not _group_alive(pgid)  # ... but nothing in it runs
    finally:
        proc.kill()
        proc.wait()
    assert not _group_alive(pgid)
