"""The local test cluster itself: a 2-node batch job runs one task per node (SLURM_NODEID 0 and 1)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slurm


def test_two_node_batch_job(slurm_cluster, tmp_path):
    script = tmp_path / "two_nodes.sh"
    script.write_text(
        "#!/bin/bash\n"
        "set -eu\n"
        'srun --ntasks-per-node=1 bash -c \'echo "node=$SLURM_NODEID of=$SLURM_NNODES host=$SLURMD_NODENAME"\'\n'
    )
    out = tmp_path / "job.out"
    job, rc = slurm_cluster.sbatch_wait("-N2", "--ntasks-per-node=1", "-o", str(out), str(script))
    assert rc == 0, out.read_text() if out.exists() else slurm_cluster.logs()
    lines = sorted(l for l in out.read_text().splitlines() if l.startswith("node="))
    assert lines == ["node=0 of=2 host=n1", "node=1 of=2 host=n2"], out.read_text()
