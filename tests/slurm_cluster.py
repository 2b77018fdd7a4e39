"""A throw-away SLURM cluster on this machine, for tests of the ``slurm/`` batch scripts.

``slurm_cluster(base_dir=None, nodes=2)`` is a context manager that

1. installs SLURM and munge from the distribution's packages if ``slurmctld`` is missing
   (``apt-get update`` first; Debian bookworm gives SLURM 22.05 and munge 0.5.15). Without root or
   apt, or when the install fails (no network), the caller is skipped with the reason;
2. starts a private ``munged`` (own key and socket under ``base_dir``, by default a fresh
   temporary directory removed afterwards), one ``slurmctld`` and
   ``nodes`` emulated ``slurmd`` (``n1..nN``, all on 127.0.0.1, each with its own port). Ports are
   picked free at start-up, so several clusters (or other services) on one machine do not collide;
3. yields a :class:`SlurmCluster` handle: ``submit()`` runs ``sbatch --parsable --wait`` and
   returns the batch script's exit code and its ``--output`` file, ``start_job()`` does the same in
   the background (for jobs that are signalled while they run), ``run()`` calls any SLURM client;
4. always stops everything BY PID (``finally``): cancels the jobs, ``scontrol shutdown``, waits
   for the daemons, then SIGTERM/SIGKILL to the pids of any left, then munged. The daemons run in
   the foreground (``-D``, ``--foreground``) as children of this process, so their pids are known
   without pid files and they are reaped. No process is ever looked up or killed by name.

Nothing outside ``base_dir`` is written except by the package install; the daemons' state, spool,
logs, pid files and the munge key all live under it. Settings chosen for short test jobs:
``MinJobAge=4`` (below 4 s ``sbatch --wait`` polls every 2 s; a larger value makes it back off to
32 s), ``cred_expire=5`` (a requeued job may start again after ~6 s instead of 120 s) and
``sched_interval=2`` (the scheduler notices that time has passed within 2 s, not 60 s). Every
wait here has a timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# the daemons live in /usr/sbin, which a non-root-style PATH may lack
SEARCH_PATH = os.pathsep.join(dict.fromkeys(
    os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/sbin", "/usr/sbin", "/sbin",
                                                    "/usr/bin", "/bin"]))
DAEMON_START_TIMEOUT = 60.0


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (the reason is the message)."""


def _run(cmd: Sequence[str], timeout: float, env: Optional[Mapping[str, str]] = None,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), env=dict(env) if env is not None else None, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}")
    return proc


def ensure_slurm_installed(timeout: float = 600.0) -> None:
    """Install the SLURM/munge packages if ``slurmctld`` is missing; ``SlurmUnavailable`` if not possible."""
    binaries = ("slurmctld", "slurmd", "sbatch", "munged", "mungekey")
    if all(shutil.which(b, path=SEARCH_PATH) for b in binaries):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmctld is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurmctld is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        update = _run(["apt-get", "update", "-qq"], timeout=timeout, env=env, check=False)
        if update.returncode != 0:
            raise SlurmUnavailable(f"apt-get update failed (no network?):\n{update.stdout[-2000:]}")
        install = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "-o", "DPkg::Lock::Timeout=120", *PACKAGES],
                       timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        raise SlurmUnavailable(f"{' '.join(e.cmd)} timed out after {timeout:.0f} s") from None
    if install.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed:\n"
                               f"{install.stdout[-2000:]}")
    missing = [b for b in binaries if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        raise RuntimeError(f"apt-get install succeeded but {missing} are still not found")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free right now (the kernel picks them)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclasses.dataclass
class JobResult:
    job_id: str
    returncode: int          # the batch script's exit code as `sbatch --wait` reports it
    output_path: Path        # the job's --output file
    sbatch_output: str       # what sbatch itself printed (job id, errors)

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""


class RunningJob:
    """A job submitted with ``sbatch --parsable --wait`` in the background."""

    def __init__(self, cluster: "SlurmCluster", proc: subprocess.Popen, sbatch_log: Path,
                 output_pattern: str):
        self.cluster, self.proc, self.sbatch_log = cluster, proc, sbatch_log
        self._output_pattern = output_pattern
        self.job_id = self._read_job_id(timeout=30.0)
        self.output_path = Path(output_pattern.replace("%j", self.job_id))

    def _read_job_id(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.sbatch_log.read_text(errors="replace") if self.sbatch_log.exists() else ""
            first = text.strip().splitlines()[0] if text.strip() else ""
            if first.split(";")[0].isdigit():
                return first.split(";")[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"sbatch exited {self.proc.returncode} without a job id:\n{text}")
            time.sleep(0.1)
        self.proc.kill()
        raise TimeoutError(f"sbatch printed no job id within {timeout} s")

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def wait_for_output(self, pattern: str, timeout: float, poll: float = 0.1) -> str:
        """Wait until the job's output matches the regex ``pattern``; returns the output so far."""
        deadline = time.monotonic() + timeout
        needle = re.compile(pattern, re.MULTILINE)
        while time.monotonic() < deadline:
            text = self.output
            if needle.search(text):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"job {self.job_id} ended (sbatch rc {self.proc.returncode}) "
                                     f"before printing {pattern!r}:\n{text[-4000:]}")
            time.sleep(poll)
        raise TimeoutError(f"job {self.job_id} did not print {pattern!r} within {timeout} s:\n"
                           f"{self.output[-4000:]}")

    def wait(self, timeout: float) -> JobResult:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cluster.run(["scancel", self.job_id], check=False)
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise TimeoutError(f"job {self.job_id} did not finish within {timeout} s:\n"
                               f"{self.output[-4000:]}") from None
        return JobResult(self.job_id, rc, self.output_path,
                         self.sbatch_log.read_text(errors="replace"))


class SlurmCluster:
    """Private munged + slurmctld + ``nodes`` emulated slurmd under ``base``."""

    def __init__(self, base: os.PathLike, nodes: int = 2, cpus_per_node: Optional[int] = None):
        self.base = Path(base).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node or os.cpu_count() or 1
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.conf = self.base / "etc" / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.jobs_dir = self.base / "jobs"
        self._procs: dict = {}   # name -> Popen of munged, slurmctld, slurmd-nI
        self._jobs = 0
        # Job ids start at a random number: scripts derive ports from the job id, and two test
        # clusters on one machine must not hand out the same ids (and so the same ports).
        self.first_job_id = random.SystemRandom().randrange(1000, 2_000_000)

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict:
        """The environment for SLURM clients (and, through sbatch's --export=ALL, for jobs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = SEARCH_PATH
        return env

    def run(self, cmd: Sequence[str], timeout: float = 30.0, check: bool = True,
            env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sinfo, scontrol, scancel, squeue...) against this cluster."""
        return _run(cmd, timeout=timeout, env={**self.env, **(env or {})}, check=check)

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        ensure_slurm_installed()
        for parent in self.base.parents:   # munged: every directory above its socket needs o+x
            if parent.exists() and not os.stat(parent).st_mode & 0o001:
                raise RuntimeError(f"{parent} is not world-searchable (o+x), munged would refuse "
                                   f"a socket under {self.base}; use another base directory")
        try:
            for d in ("etc", "state", "spool", "log", "run", "munge/key", "jobs"):
                (self.base / d).mkdir(parents=True, exist_ok=True)
            os.chmod(self.base, 0o755)
            os.chmod(self.base / "munge", 0o755)   # munged wants o+x on its socket directory
            os.chmod(self.base / "munge" / "key", 0o700)
            self._start_munged()
            self._write_conf()
            self._start_slurm()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, cmd: Sequence[str]) -> subprocess.Popen:
        """Start a daemon in the foreground as our child: its pid is known without pid files,
        it can be waited for (no zombie) and stopped by that pid."""
        log = open(self.base / "log" / f"{name}.out", "ab")
        try:
            proc = subprocess.Popen(list(cmd), env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self._procs[name] = proc
        return proc

    def _start_munged(self) -> None:
        key = self.base / "munge" / "key" / "munge.key"
        if not key.exists():
            _run(["mungekey", "-c", "-k", str(key)], timeout=30, env=self.env)
        m = self.base / "munge"
        proc = self._spawn("munged", [
            "munged", "--foreground", "-S", str(self.munge_socket), f"--key-file={key}",
            f"--log-file={m / 'munged.log'}", f"--pid-file={m / 'munged.pid'}",
            f"--seed-file={m / 'munged.seed'}"])
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"munged exited {proc.returncode}:\n"
                                   + (self.base / "log" / "munged.out").read_text(errors="replace"))
            if self.munge_socket.exists():
                cred = _run(["munge", "-S", str(self.munge_socket), "-n"], timeout=10,
                            env=self.env, check=False)
                if cred.returncode == 0 and subprocess.run(
                        ["unmunge", "-S", str(self.munge_socket)], input=cred.stdout, text=True,
                        env=self.env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        timeout=10).returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged not answering on {self.munge_socket}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        mem = 1024
        probe = _run(["slurmd", "-C"], timeout=30, env=self.env, check=False).stdout
        for tok in probe.split():
            if tok.startswith("RealMemory="):
                mem = max(1, int(tok.split("=", 1)[1]) // self.nodes)
        host = socket.gethostname().split(".")[0]
        b = self.base
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory={mem} State=UNKNOWN"
            for name, port in zip(self.node_names, node_ports))
        self.conf.write_text(f"""\
# generated by tests/slurm_cluster.py
ClusterName=coe-test
FirstJobId={self.first_job_id}
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=4
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start_slurm(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-f", str(self.conf), "-N", name])
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        idle = ""
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self._procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"daemon(s) exited during start-up: {dead}\n"
                                   f"{cluster_logs(self)}")
            idle = self.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], check=False).stdout.strip()
            if idle == str(self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"{self.nodes} nodes not idle after {DAEMON_START_TIMEOUT} s "
                           f"(idle: {idle!r})\n{cluster_logs(self)}")

    def stop(self) -> None:
        """Stop every daemon this cluster started, by pid; safe to call more than once."""
        slurm = {n: p for n, p in self._procs.items() if n != "munged"}
        if any(p.poll() is None for p in slurm.values()):
            try:   # cancel jobs (their processes belong to slurmstepd) and let them end
                self.run(["scancel", "--quiet", "--user=root"], timeout=15, check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(
                        ["squeue", "-h", "-t", "running,completing", "-o", "%i"],
                        timeout=15, check=False).stdout.strip():
                    time.sleep(0.2)
            except Exception:
                pass
            with contextlib.suppress(Exception):
                self.run(["scontrol", "shutdown"], timeout=15, check=False)
            self._reap(slurm.values(), grace=15)
        if "munged" in self._procs:
            self._reap([self._procs["munged"]], grace=0)
        self._procs.clear()

    @staticmethod
    def _reap(procs, grace: float) -> None:
        """Wait ``grace`` s for ``procs`` to exit, then SIGTERM, then SIGKILL; always reap."""
        procs = list(procs)
        deadline = time.monotonic() + grace
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                for p in procs:
                    if p.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.send_signal(sig)
                deadline = time.monotonic() + 5
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
            if all(p.poll() is not None for p in procs):
                return

    # ------------------------------------------------------------------ jobs
    def _sbatch_cmd(self, script, args, sbatch_args, name) -> tuple[list, str]:
        self._jobs += 1
        name = name or f"job{self._jobs}"
        output = str(self.jobs_dir / f"{name}_%j.out")
        cmd = ["sbatch", "--parsable", "--wait", f"--job-name={name}", f"--output={output}",
               *sbatch_args, str(script), *args]
        return cmd, output

    def start_job(self, script: os.PathLike, args: Sequence[str] = (),
                  sbatch_args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
                  name: Optional[str] = None, cwd: Optional[os.PathLike] = None) -> RunningJob:
        """Submit in the background (``sbatch --parsable --wait``); ``.wait(timeout)`` for the result."""
        cmd, output = self._sbatch_cmd(script, args, sbatch_args, name)
        log = self.jobs_dir / f"sbatch-{self._jobs}.log"
        with open(log, "w") as f:
            # stdbuf: sbatch prints the job id at submission; do not let stdio hold it back
            prefix = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
            proc = subprocess.Popen(prefix + cmd, env={**self.env, **(env or {})}, cwd=cwd,
                                    stdout=f, stderr=subprocess.STDOUT, text=True)
        return RunningJob(self, proc, log, output)

    def submit(self, script: os.PathLike, args: Sequence[str] = (),
               sbatch_args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
               name: Optional[str] = None, cwd: Optional[os.PathLike] = None,
               timeout: float = 300.0) -> JobResult:
        """``sbatch --parsable --wait``: the batch script's exit code and its output file."""
        return self.start_job(script, args, sbatch_args, env, name, cwd).wait(timeout)


@contextlib.contextmanager
def slurm_cluster(base: Optional[os.PathLike] = None, nodes: int = 2,
                  cpus_per_node: Optional[int] = None) -> Iterator[SlurmCluster]:
    """Bring a private cluster up under ``base``, yield it, always shut it down (by pid).

    Without ``base`` a fresh directory under the system temp dir is used and removed afterwards
    (pytest's ``tmp_path`` does not do: its parents are 0700 and munged refuses a socket there).
    """
    made = base is None
    if made:
        base = tempfile.mkdtemp(prefix="coe-slurm-")
        os.chmod(base, 0o755)
    cluster = SlurmCluster(base, nodes=nodes, cpus_per_node=cpus_per_node)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if made:
            shutil.rmtree(base, ignore_errors=True)


def cluster_logs(cluster: SlurmCluster, lines: int = 30) -> str:
    """The tails of the daemons' logs, for assertion messages."""
    out = []
    for p in sorted((cluster.base / "log").glob("*.log")):
        out.append(f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


@contextlib.contextmanager
def cluster_or_skip(nodes: int = 2, cpus_per_node: Optional[int] = None) -> Iterator[SlurmCluster]:
    """``slurm_cluster`` for a pytest fixture: the test is skipped, with the reason, only when
    SLURM is not installed and cannot be installed here."""
    import pytest

    try:
        ensure_slurm_installed()
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM: {e}")
    with slurm_cluster(nodes=nodes, cpus_per_node=cpus_per_node) as c:
        yield c
