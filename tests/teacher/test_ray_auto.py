"""``ray_address=auto`` with no running cluster starts a private local Ray (and says so in one line);
an explicit address that cannot be reached is a one-line ConfigError naming it, within seconds.
Run under ``unshare -n`` (loopback only): other users' Ray clusters on the host are then unreachable."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import sys, ray
    from distill.teacher.connect import ray_init
    from distill.teacher.ray_service import stop_ray
    tcfg = type("T", (), dict(ray_address="auto", replicas=1, shards=1, ray_node_ip="127.0.0.2"))()
    started = ray_init(tcfg, temp_dir=sys.argv[1], namespace="distill-icldist")
    ips = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    print("RESULT", started, ips, ray.get_runtime_context().namespace, flush=True)
    stop_ray()
""")


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there now


@pytest.mark.slow
def test_auto_without_cluster_starts_a_private_local_ray():
    pytest.importorskip("ray")
    temp = f"/tmp/rauto_{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER, temp], capture_output=True, text=True, env=env,
                             timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        said = [x for x in out.stdout.splitlines() if "no running Ray cluster found" in x]
        assert len(said) == 1 and "starting a private local Ray on 127.0.0.2" in said[0], out.stdout
        assert "RESULT True ['127.0.0.2'] distill-icldist" in out.stdout, out.stdout
        assert not list(Path(temp).glob("distill-ray-*.json"))  # recorded, then forgotten by stop_ray
    finally:
        from distill.teacher.ray_service import cleanup_local_ray

        cleanup_local_ray(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("form", ["{}", "ray://{}"])
def test_unreachable_explicit_address_is_a_config_error_naming_it(form, monkeypatch):
    pytest.importorskip("ray")
    import time

    from distill.config import ConfigError
    from distill.errors import UserError, one_line
    from distill.teacher.connect import ray_init
    from distill.teacher.ray_service import connect_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = form.format(f"127.0.0.1:{_refused_port()}")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as ei:
        connect_ray(address)
    assert address in str(ei.value) and one_line(str(ei.value)) == str(ei.value)
    tcfg = SimpleNamespace(ray_address=address, replicas=1, shards=1, ray_node_ip="127.0.0.2")
    with pytest.raises(UserError, match=address.replace(".", r"\.")):
        ray_init(tcfg, temp_dir="/tmp/ray_icldist", namespace="distill-icldist")
    assert time.monotonic() - t0 < 30


def test_unreachable_ray_address_env_is_named(monkeypatch):
    pytest.importorskip("ray")
    from distill.config import ConfigError
    from distill.teacher.ray_service import connect_ray

    address = f"127.0.0.1:{_refused_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS={address}"):
        connect_ray(None)
