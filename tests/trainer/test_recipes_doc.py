"""docs/recipes.md shows memory figures computed by ``python -m distill.dist.plan --config``: every
command on the page is rerun here and the lines shown under it must be what it prints now (a
changed config or planner that leaves the page stale fails)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

BLOCK = re.compile(r"```bash\n(python -m distill\.dist\.plan [^\n]+)\n```\n```text\n(.*?)\n```", re.S)


def test_every_plan_command_in_recipes_prints_the_lines_shown():
    text = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    blocks = BLOCK.findall(text)
    assert len(blocks) >= 6, "docs/recipes.md lost its computed memory blocks"
    configs = set()
    for cmd, shown in blocks:
        args = cmd.split()[3:]
        configs.add(args[args.index("--config") + 1])
        out = subprocess.run([sys.executable, "-m", "distill.dist.plan", *args], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr
        printed = out.stdout.splitlines()
        for line in shown.splitlines():
            assert line in printed, f"{cmd}\n  shown:   {line}\n  printed: {printed[-1]}"
    for c in configs:  # every recipe config named on the page exists
        assert (REPO / c).is_file(), c
    assert Path(REPO / "launchers/configs/llama-3.1-70b-instruct_harvest.yaml").is_file()
