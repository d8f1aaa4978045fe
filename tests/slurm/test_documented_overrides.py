"""Every ``--section.key=value`` the sbatch scripts show (comments and code) and docs/slurm.md shows
names a key of the launcher's config schema: a typo there (e.g. ``--train.max_steps``) fails here, not
on a cluster after a queue wait. No cluster needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OVERRIDE = re.compile(r"--([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=")


def _schemas() -> dict:
    from distill.icldist.config import ICLDistConfig
    from distill.knowdist.harvest import HarvestConfig
    from distill.knowdist.stage import KnowDistConfig

    return {"knowdist": KnowDistConfig, "icldist": ICLDistConfig, "harvest": HarvestConfig}


def _has_key(cls, dotted: str) -> bool:
    from distill.config import _field_types, _is_dataclass_type

    tp = cls
    for part in dotted.split("."):
        if not _is_dataclass_type(tp):
            return False
        types_ = _field_types(tp)
        if part not in types_:
            return False
        tp = types_[part]
    return True


def _documented() -> list[tuple[str, int, str]]:
    files = sorted((REPO / "slurm").glob("*.sh")) + sorted((REPO / "slurm" / "lib").glob("*.sh")) + [REPO / "docs" / "slurm.md"]
    out = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            out += [(str(f.relative_to(REPO)), n, k) for k in OVERRIDE.findall(line) if k != "section.key"]
    return out


def test_the_scripts_and_docs_document_overrides():
    assert len(_documented()) >= 10


@pytest.mark.parametrize("where,line,key", _documented(), ids=lambda x: str(x))
def test_documented_override_is_a_config_key(where, line, key):
    schemas = _schemas()
    name = Path(where).stem
    if name in schemas:  # a launcher's own script
        ok = {name: _has_key(schemas[name], key)}
    elif name == "common":  # shared by knowdist.sh and icldist.sh
        ok = {n: _has_key(schemas[n], key) for n in ("knowdist", "icldist")}
    else:  # docs/slurm.md covers every script: the key must exist for at least one launcher
        ok = {n: _has_key(c, key) for n, c in schemas.items()}
        ok = {"any": any(ok.values())}
    assert all(ok.values()), f"{where}:{line}: --{key}= is not a key of {[n for n, v in ok.items() if not v]}'s config"
