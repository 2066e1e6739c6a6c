"""A real one-node SLURM cluster for tests: its own munged, slurmctld and slurmd, all files in one directory.

Everything is private to the directory (munge socket and key, state, spool, logs, pid files, free ports), so
several clusters can run on one host. Daemons are stopped by the pids they wrote.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


def missing_commands() -> list[str]:
    return [name for name in NEEDED if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 8):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []
        self._socket_dir: Path | None = None

    # ----- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        root = self.root
        keys, run = root / "munge-key", root / "run"
        for d in (keys, run, root / "state", root / "spool", root / "log"):
            d.mkdir(parents=True, exist_ok=True)
        keys.chmod(0o700)  # munged refuses a key others can read
        # ... and a socket whose directory or any parent others cannot traverse (pytest's tmp dirs are 0700)
        self._socket_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self._socket_dir.chmod(0o755)
        key = keys / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self._socket_dir / "munge.socket"
        self._daemon(["munged", f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--log-file={root / 'log' / 'munged.log'}", f"--pid-file={run / 'munged.pid'}",
                      f"--seed-file={keys / 'munged.seed'}"], run / "munged.pid")
        self.conf.write_text(self._conf_text(run))
        self._daemon(["slurmctld", "-f", str(self.conf)], run / "slurmctld.pid")
        self._daemon(["slurmd", "-f", str(self.conf)], run / "slurmd.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.cmd("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"slurm node never became idle (state {out!r}); logs in {root / 'log'}")

    def _conf_text(self, run: Path) -> str:
        root = self.root
        return "\n".join([
            "ClusterName=pytest",
            f"SlurmctldHost={self.host}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",   # a requeued job may start again after 10 s (default 120)
            "SlurmUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={run / 'slurmctld.pid'}",
            f"SlurmdPidFile={run / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "SlurmdParameters=config_overrides",  # trust the CPU count below: jobs of a test share the cores
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job`
            # a requeued job is started once its cred_expire hold ends, not at the next 60 s / 30 s scheduler pass
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            f"NodeName={self.host} CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _daemon(self, argv: list[str], pid_file: Path) -> None:
        subprocess.run(argv, env=self.env, check=True, capture_output=True, text=True, timeout=60)
        deadline = time.time() + 20
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            if time.time() > deadline:
                raise RuntimeError(f"{argv[0]} wrote no pid file {pid_file}")
            time.sleep(0.1)
        self._pid_files.append(pid_file)

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons newest first, by their pids."""
        if self.conf.is_file():
            self.cmd("scancel", "--full", "--user", "root", check=False)
        for pid_file in reversed(self._pid_files):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._pid_files.clear()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # ----- helpers ---------------------------------------------------------------------------------------------------
    def cmd(self, *argv: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} -> exit {result.returncode}: {result.stderr.strip()}")
        return result

    def submit(self, *argv: str, cwd: Path, env: dict | None = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *argv], cwd=cwd, env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} when unknown."""
        out = self.cmd("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: int, predicate, timeout: float, what: str) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info and predicate(info):
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id}: {what} not reached in {timeout:.0f} s; last {self.job(job_id)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True
