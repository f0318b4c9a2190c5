"""Helpers shared by the multi-process tests: a free port on 127.0.0.1 and a launcher run bounded in time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (chosen by the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra: str) -> dict:
    """The environment for a launcher's workers: one thread each, gloo on the loopback, gradsel importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.update(extra)
    return env


def run_launcher(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher (torchrun, ``accelerate launch``) in its own session; past ``timeout`` seconds kill the
    whole session (the launcher and the workers it started) and raise ``TimeoutError``."""
    proc = subprocess.Popen(cmd, env=env or launcher_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this call started: the launcher and its workers
        out, err = proc.communicate()
        raise TimeoutError(f"{cmd[:4]}... still running after {timeout} s (killed)\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(script: Path, *args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` on 127.0.0.1 with a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args]


def spawn_ranks(target, world: int, *args, out: Path, timeout: float, errors: str = "*.err") -> None:
    """Run ``target(rank, world, port, *args)`` in ``world`` spawned processes (a free port on 127.0.0.1),
    each bounded by ``timeout`` seconds: a worker still alive then is killed and the test fails. A worker
    reports a failure by writing a file matching ``errors`` into ``out`` (its traceback)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(5)
    failed = [f.read_text() for f in sorted(Path(out).glob(errors))]
    assert not failed, "worker failed:\n" + "\n".join(failed)
    assert not alive, f"workers still running after {timeout} s (killed)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int, err: Path, timeout: float):
    """Inside a spawned worker: one thread, a gloo process group on 127.0.0.1, always destroyed; a failure's
    traceback goes to ``err`` (what :func:`spawn_ranks` collects) before it is raised."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        try:
            yield
            dist.barrier()  # leave together: a rank tearing down gloo while its peer still talks can abort the peer
        finally:
            dist.destroy_process_group()
    except BaseException:
        Path(err).write_text(traceback.format_exc())
        raise
