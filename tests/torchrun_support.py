"""Starting lvd under torchrun in tests, killing one of its ranks, and comparing run folders byte for byte."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Files that may differ between equal runs: the commit record (times, hosts, world size), the
# merged config (its run_dir) and the submitit logs.
VOLATILE = ("_SUCCESS.json", "config.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(tag: str) -> dict[str, str]:
    """The environment of a launch: one thread per rank, and a tag that finds its ranks in /proc."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "LVD_TEST_TAG": tag}


def standalone(module: str, config: Path, tag: str, cwd: Path, nproc: int = 2) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node NPROC -m MODULE CONFIG`, started, not waited for."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", module, str(config)]
    return subprocess.Popen(cmd, cwd=cwd, env=torchrun_env(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


def rank_pid(tag: str, rank: int) -> int | None:
    """The process of rank `rank` of the launch tagged `tag` (torchrun's agent has no RANK)."""
    want = {f"LVD_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= environ:
            return int(entry.name)
    return None


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll until `condition()` holds; fail with the launch's output if it ends or times out first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            code, out = finish(proc, 5)
            raise AssertionError(f"launch ended ({code}) before the condition held:\n{out[-3000:]}")
        time.sleep(0.1)


def kill_rank(tag: str, rank: int, proc: subprocess.Popen) -> str:
    """SIGKILL one rank; torchrun then stops the others and exits with an error. Returns its output."""
    pid = rank_pid(tag, rank)
    assert pid is not None, f"no rank {rank} process tagged {tag}"
    os.kill(pid, signal.SIGKILL)
    code, out = finish(proc, 120)
    assert code != 0, out[-3000:]
    return out


def folder_bytes(folder: Path, skip: tuple[str, ...] = VOLATILE) -> dict[str, bytes]:
    """Every file under `folder` by relative path, but the volatile ones and submitit's logs."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip and "submitit" not in p.relative_to(folder).parts
    }
