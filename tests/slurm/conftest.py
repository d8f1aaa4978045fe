"""A real single-host SLURM cluster for the sbatch tests: two nodes ``n1`` / ``n2`` on 127.0.0.1.

The session fixture ``slurm_cluster`` writes a ``slurm.conf`` into a temporary directory, starts
``munged`` (its own key and socket there; ``auth/none`` when munge is not installed), ``slurmctld -c``
and one ``slurmd -N <node>`` per node, waits until both nodes are idle, and on teardown stops the
daemons it started (foreground processes, by handle) and removes the state. Every client call and every job sees the
cluster through ``SLURM_CONF`` (set for the whole session, restored afterwards).

Skips with the reason when the SLURM binaries are missing (``apt-get install slurmctld slurmd
slurm-client munge``). Run the tests inside a loopback-only network namespace, as CI does:
``unshare -n bash -c 'ip link set lo up && python -m pytest tests/slurm -q'``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODES = ("n1", "n2")
CPUS_PER_NODE = 4  # declared, not real: SlurmdParameters=config_overrides lets the 2-core host offer more
_SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(name, path=path)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class LocalSlurm:
    """Handle of the running test cluster; ``env`` is what clients and jobs need (SLURM_CONF)."""

    root: Path
    conf: Path
    auth: str
    nodes: tuple[str, ...] = NODES
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    repo: Path = REPO

    @staticmethod
    def free_ports(n: int) -> list[int]:
        return _free_ports(n)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {p.stdout}{p.stderr}\n{self.logs()}")
        return p

    def sbatch_wait(self, *args: str, timeout: float = 600, env: dict | None = None) -> tuple[int, int]:
        """``sbatch --wait --parsable ARGS``; returns (job id, exit status of sbatch = the job's)."""
        p = subprocess.run(["sbatch", "--wait", "--parsable", *args], env=env or self.env,
                           capture_output=True, text=True, timeout=timeout)
        first = (p.stdout.strip().splitlines() or [""])[0]
        if not first.split(";")[0].isdigit():
            raise AssertionError(f"sbatch failed (rc {p.returncode}): {p.stdout}\n{p.stderr}\n{self.logs()}")
        return int(first.split(";")[0]), p.returncode

    def job_state(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` fields (state, exit code); empty once the job aged out (MinJobAge)."""
        p = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        out = {}
        for tok in p.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out[k] = v
        return out

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


def _write_conf(root: Path, auth: str, munge_socket: Path | None) -> Path:
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=distilltest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.pid",  # unused: the fixture holds each daemon's handle
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # Declaring more CPUs than the host has is fine only with config_overrides ("Low CPUs" otherwise).
        "SlurmdParameters=config_overrides",
        # Without it `sbatch --wait` polls with a 2/8/32 s back-off (a 16 s job returns after 42 s).
        "MinJobAge=5",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "InactiveLimit=0",
        "KillWait=30",  # SLURM's default: a cancelled job's teardown must fit in it
        "SlurmctldTimeout=60",
        "SlurmdTimeout=60",
    ]
    if auth == "munge":
        lines += ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}"]
    else:
        lines += ["AuthType=auth/none", "CredType=cred/none"]
    for name, port in zip(NODES, node_ports):
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                     f"CPUs={CPUS_PER_NODE} RealMemory=8000 State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _start_munge(root: Path, daemon) -> Path | None:
    """munged with its own key and socket under ``root``; None if it is not installed or does not come up."""
    munged = _which("munged")
    if munged is None:
        return None
    d = root / "munge"
    d.mkdir()
    d.chmod(0o755)  # munged refuses a socket directory that others cannot traverse
    key = d / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    sock = d / "munge.socket"
    daemon("munged", munged, "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
           f"--pid-file={d}/munged.pid", f"--log-file={root}/log/munged.log", f"--seed-file={d}/munged.seed")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not sock.exists():
        time.sleep(0.05)
    return sock if sock.exists() else None


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# TEST-NET-1 (RFC 5737): never routed. Added to `lo` only inside a loopback-only network namespace.
_ADDRCONFIG_ADDR = "192.0.2.1/32"


def _ensure_addrconfig() -> bool:
    """Make a loopback-only namespace acceptable to the SLURM daemons; True if an address was added.

    slurmd and slurmctld resolve their listen address with getaddrinfo(NULL, port, AI_PASSIVE |
    AI_ADDRCONFIG), and glibc's AI_ADDRCONFIG ignores loopback addresses: in ``unshare -n`` with only
    ``lo`` up every daemon fails with "Unable to resolve (null)". One never-routed address on ``lo``
    fixes that, and nothing can leave a namespace that has no other interface.
    """
    flags = socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    try:
        socket.getaddrinfo(None, 6817, socket.AF_INET, socket.SOCK_STREAM, 0, flags)
        return False
    except socket.gaierror:
        pass
    ifaces = sorted(name for _, name in socket.if_nameindex())  # this namespace's (sysfs may show the host's)
    ip = _which("ip")
    if ifaces != ["lo"] or ip is None:
        pytest.skip(f"getaddrinfo(AI_ADDRCONFIG) finds no IPv4 address (interfaces {ifaces}); SLURM daemons cannot bind")
    p = subprocess.run([ip, "addr", "add", _ADDRCONFIG_ADDR, "dev", "lo"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"loopback-only namespace and cannot add {_ADDRCONFIG_ADDR} to lo: {p.stderr.strip()}")
    return True


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo") if _which(b) is None]
    if missing:
        pytest.skip(f"SLURM binaries missing ({', '.join(missing)}): "
                    "apt-get install slurmctld slurmd slurm-client munge")
    # Short root: munge and slurmd sockets have a 108-byte path limit.
    root = Path(tmp_path_factory.mktemp("slurm", numbered=True))
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    for n in NODES:
        (root / "spool" / n).mkdir()

    procs: dict[str, subprocess.Popen] = {}

    def daemon(name: str, *argv: str) -> None:
        # Foreground daemons (-D / -F) so the fixture holds their handles and stops exactly them.
        log = open(root / "log" / f"{name}.out", "w")
        procs[name] = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
        log.close()

    old_conf = os.environ.get("SLURM_CONF")
    added_addr = _ensure_addrconfig()
    try:
        sock = _start_munge(root, daemon)
        auth = "munge" if sock is not None else "none"
        conf = _write_conf(root, auth, sock)
        cluster = LocalSlurm(root=root, conf=conf, auth=auth, procs=procs)
        os.environ["SLURM_CONF"] = str(conf)
        daemon("slurmctld", _which("slurmctld"), "-D", "-c", "-f", str(conf))
        pidfile = root / "run" / "slurmd.pid"
        for n in NODES:
            daemon(f"slurmd.{n}", _which("slurmd"), "-D", "-N", n, "-f", str(conf))
            # This build has one SlurmdPidFile for all nodes (no %n), and a starting slurmd kills the
            # pid it finds there: remove it once written so n2 does not kill n1.
            deadline = time.monotonic() + 30
            while (pidfile.read_text().strip() if pidfile.exists() else "") != str(procs[f"slurmd.{n}"].pid):
                if time.monotonic() > deadline or procs[f"slurmd.{n}"].poll() is not None:
                    raise RuntimeError(f"slurmd -N {n} did not start\n{cluster.logs()}")
                time.sleep(0.05)
            pidfile.unlink()
        deadline = time.monotonic() + 60
        states = ""
        while time.monotonic() < deadline:
            dead = {k: p.returncode for k, p in procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"SLURM daemons exited: {dead}\n{cluster.logs()}")
            states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            if sorted(states.split()) == sorted([*NODES, *["idle"] * len(NODES)]):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"nodes never became idle: {states!r}\n{cluster.logs()}")
        yield cluster
    finally:
        for name in [k for k in procs if k.startswith("slurmd.")] + ["slurmctld", "munged"]:
            if name in procs:
                _stop(procs[name])
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        shutil.rmtree(root, ignore_errors=True)
        if added_addr:
            subprocess.run([_which("ip"), "addr", "del", _ADDRCONFIG_ADDR, "dev", "lo"], capture_output=True)
