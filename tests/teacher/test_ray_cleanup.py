"""No stray processes: after ``kill -9`` of a run that started a private Ray, the processes of that Ray
session are ended by the next start (distill.teacher.ray_service.cleanup_local_ray), found through the
record the starter wrote, never by name. Run under ``unshare -n`` (loopback only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import sys
    from distill.teacher.ray_service import start_local_ray
    record = start_local_ray(1, sys.argv[1])
    print(record, flush=True)
    import time
    time.sleep(600)
""")


def _alive(pid):
    from distill.teacher.ray_service import _start_time

    return _start_time(pid) is not None


def test_killed_run_leaves_no_ray_process_after_cleanup(tmp_path):
    pytest.importorskip("ray")
    from distill.teacher.ray_service import cleanup_local_ray, session_pids

    temp = f"/tmp/ray_clean_{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, temp], stdout=subprocess.PIPE, text=True, env=env)
    try:
        record = Path(driver.stdout.readline().strip())
        rec = json.loads(record.read_text())
        assert rec["driver_pid"] == driver.pid and rec["session_dir"].startswith(temp + "/")
        assert cleanup_local_ray(temp) == [] and record.is_file()  # the run is alive: left alone
        # wait for the raylet's agents (not recorded at start: found through the session dir)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            extra = set(session_pids(rec["session_dir"])) - set(rec["pids"]) - {driver.pid}
            if len(extra) >= 2:
                break
            time.sleep(0.5)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        time.sleep(5)  # what dies with its driver has died by now
        left = session_pids(rec["session_dir"], rec["pids"])
        names = {Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") for p in left}
        assert left and any("Agent" in n for n in names), names  # the strays of today
        ended = cleanup_local_ray(temp)
        assert set(left) <= set(ended)
        assert not [p for p in ended if _alive(p)] and not record.exists()
        assert session_pids(rec["session_dir"]) == []
    finally:
        if driver.poll() is None:
            driver.kill()
        cleanup_local_ray(temp)
        shutil.rmtree(temp, ignore_errors=True)
