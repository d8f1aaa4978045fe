"""Process environment: rank / world size / local rank, process-group init, rank-0 helpers.

Ranks come from the environment the launcher sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; the
``deepspeed`` launcher also passes ``--local_rank``; under SLURM ``srun`` the ``SLURM_PROCID`` /
``SLURM_NTASKS`` / ``SLURM_LOCALID`` variables are used when ``RANK`` is unset). A plain
``python script.py`` is rank 0 of 1. deepspeed is imported only inside :func:`init_distributed`.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from dataclasses import dataclass


@dataclass
class DistEnv:
    rank: int = 0  # global rank
    world_size: int = 1  # processes in the job
    local_rank: int = 0  # rank on this node (selects the GPU)
    backend: str = ""  # process-group backend ("" = none initialised)
    device: str = "cpu"  # torch device string of this rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV = DistEnv()


def local_rank_from_argv(argv: list[str] | None = None) -> int | None:
    """``--local_rank N`` / ``--local_rank=N`` / ``--local-rank=N`` as passed by launchers."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        for flag in ("--local_rank", "--local-rank"):
            if a == flag and i + 1 < len(argv):
                return int(argv[i + 1])
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1])
    return None


def read_env(argv: list[str] | None = None) -> DistEnv:
    """Rank, world size and local rank of this process (no process group is created)."""
    e = os.environ
    if "RANK" not in e and "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        rank, world = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"])
        local = int(e.get("SLURM_LOCALID", 0))
    else:
        rank, world = int(e.get("RANK", 0)), int(e.get("WORLD_SIZE", 1))
        local = int(e.get("LOCAL_RANK", 0))
    arg_local = local_rank_from_argv(argv)
    if arg_local is not None:
        local = arg_local
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def set_cpu_threads() -> int:
    """CPU ranks share the cores: ``cores // ranks on this node`` intra-op threads each (what torchrun
    does through OMP_NUM_THREADS), unless OMP_NUM_THREADS is set. Oversubscribed OpenMP threads spin
    on each other: on a loaded 2-core machine 2 ranks x 2 threads ran a step 5-10x slower than 1."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    n = max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(n)
    return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say_if_building_cpu_op() -> None:
    """DeepSpeed JIT-builds its CPU communication op on first use, silently: say so, so that the
    pause before step 1 has a reason."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")  # torch's own rule: this folder as is, else a per-Python one
    root = Path(root) if root else Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    built = root / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    if not built.is_file():
        print(f"[dist] DeepSpeed builds its CPU communication op once (C++ compile; kept in {built.parent}, "
              f"TORCH_EXTENSIONS_DIR moves it)", flush=True)


def init_distributed(backend: str = "auto", *, use_deepspeed: bool = True, argv: list[str] | None = None) -> DistEnv:
    """Create the process group (deepspeed.init_distributed) and pick this rank's device.

    backend: "auto" = nccl when CUDA is available, gloo otherwise. A single process without a
    launcher gets a private loopback rendezvous (127.0.0.1, a free port).
    """
    global _ENV
    import torch

    env = read_env(argv)
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(env.local_rank % max(1, torch.cuda.device_count()))
        env.device = f"cuda:{torch.cuda.current_device()}"
    else:
        set_cpu_threads()
    if env.world_size > 1 or use_deepspeed:
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        if env.world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        elif env.rank == 0:  # the rendezvous waits for every rank: say for what, so a missing one is visible
            print(f"[dist] starting the process group: {env.world_size} ranks, backend {backend}, rendezvous at "
                  f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} (waits until every rank joins)",
                  flush=True)
        if use_deepspeed:
            if not cuda and env.rank == 0:
                _say_if_building_cpu_op()
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        else:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend=backend)
        env.backend = backend
    _ENV = env
    return env


def get_env() -> DistEnv:
    return _ENV


def is_dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def destroy() -> None:
    """Tear this rank's process group down (after a last barrier) before the process exits early (the
    stop for requeue): left to interpreter shutdown, gloo's threads can abort the process ("terminate
    called without an active exception", exit -6) instead of letting it exit with its status."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(status: int):
    """End this process with ``status``. Under several ranks: the process group is torn down (after a
    last barrier), stdout and stderr are flushed, and the process ends with ``os._exit``: left to the
    interpreter's shutdown, the C++ threads of the process group and its rendezvous store can abort
    a rank that finished its work ("terminate called without an active exception", exit -6 instead
    of its status). Everything a run writes is written and closed before this is called. One process:
    ``SystemExit(status)``, as usual."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        destroy()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    raise SystemExit(status)


def barrier() -> None:
    if is_dist():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(t):
    """In-place SUM over ranks (no-op on one process); returns ``t``."""
    if is_dist():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object0(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_dist():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def current_rank() -> int:
    """This process's global rank: the process group's once one exists, else the launcher's
    (``RANK``, or ``SLURM_PROCID`` under srun; :func:`read_env`), else 0. Starts and imports nothing."""
    dist = sys.modules.get("torch.distributed")  # not imported yet: no process group can exist
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return read_env([]).rank


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (flushes), also before the process group exists (a process a launcher
    started as rank 3 stays silent while it builds its model)."""
    if current_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not is_dist():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


AGREE_FIELDS = {"code": "code version", "config": "resolved-config hash", "world_size": "world size",
                "tokenizer": "tokenizer fingerprint"}


def ranks_disagree(prints: list[dict]) -> str | None:
    """The first rank whose run fingerprint (``host`` plus :data:`AGREE_FIELDS`) differs from rank
    0's, as a one-line message naming both nodes and every differing field; None when all agree."""
    ref = prints[0]
    for rank, fp in enumerate(prints[1:], start=1):
        diffs = [f"{label} {fp.get(k)!s:.16} (rank 0: {ref.get(k)!s:.16})" for k, label in AGREE_FIELDS.items()
                 if fp.get(k) != ref.get(k)]
        if diffs:
            return (f"rank {rank} on node {fp.get('host')} does not match rank 0 on node {ref.get('host')}: "
                    f"{'; '.join(diffs)}. Every node must run the same code, config and tokenizer: sync the "
                    f"checkout/install and the files on every node, then relaunch")
    return None

