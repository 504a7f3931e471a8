"""A real two-node SLURM cluster on this host, for tests: munged, slurmctld and two slurmd (node1, node2).

Debian's slurm allows several slurmd per host: both nodes share this host's name, have NodeAddr 127.0.0.1
and one port each. Everything lives in a scratch directory; the daemons are stopped by the PIDs in their
pid files. Needs root (slurmctld runs as SlurmUser=root, munged as the munge user).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]
NODES = ("node1", "node2")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def ensure_installed() -> None:
    """apt-get the SLURM daemons and munge when missing; skip (with the reason) only without apt or root."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, base: Path):
        self.base = base
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pid_files: list[Path] = []

    def write_config(self) -> None:
        b, host = self.base, socket.gethostname().split(".")[0]
        for d in ("state", "log", "munge", *(f"spool-{n}" for n in NODES)):
            (b / d).mkdir(parents=True, exist_ok=True)
        shutil.chown(b / "munge", "munge", "munge")
        cpus = max(1, (os.cpu_count() or 2) // len(NODES))
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} "
            f"RealMemory=4000 State=UNKNOWN" for n in NODES
        )
        self.conf.write_text(f"""ClusterName=anntest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={b}/munge/munge.socket
SlurmctldPort={free_port()}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool-%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=30
MinJobAge=3600
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, cmd: list[str], pid_file: Path) -> None:
        self.pid_files.append(pid_file)
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0] if cmd[0] != 'runuser' else 'munged'} did not start: {done.stderr.strip()}")

    def start(self) -> None:
        ensure_installed()
        self.write_config()
        m = self.base / "munge"
        self._daemon(["runuser", "-u", "munge", "--", "munged", f"--socket={m}/munge.socket",
                      f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                     m / "munged.pid")
        self._daemon(["slurmctld", "-f", str(self.conf)], self.base / "slurmctld.pid")
        for n in NODES:
            self._daemon(["slurmd", "-f", str(self.conf), "-N", n], self.base / f"slurmd-{n}.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
            if len(states) == len(NODES) and all(s == "idle" for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not become idle: {states}\n{self.logs()}")

    def stop(self) -> None:
        for pid_file in reversed(self.pid_files):
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                pass

    def logs(self) -> str:
        out = []
        for f in sorted((self.base / "log").glob("*.log")):
            out.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, check=check, **kw)

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        done = self.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})}, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(t.split("=", 1) for t in text.split() if "=" in t)

    def wait(self, job_id: str, timeout: float = 600) -> dict[str, str]:
        """Wait for a final state; requeued jobs pass through PENDING again and are waited for too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")


@pytest.fixture(scope="session")
def slurm_cluster():
    # Not under pytest's tmp_path: munged (running as the munge user) must reach its socket directory.
    base = Path(tempfile.mkdtemp(prefix="ann-slurm-"))
    base.chmod(0o755)
    cluster = SlurmCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        time.sleep(1)
        shutil.rmtree(base, ignore_errors=True)
