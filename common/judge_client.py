"""Judge calls through litellm: in this process, or spread over a few client processes.

litellm spends ~4 ms of CPU per chat completion (response objects, cost lookup, logging) and an
event loop runs on one thread, so with tens of calls in flight that thread, not the provider,
sets the pace. `ClientProcessPool` runs the calls in `processes` child processes, each with its
own event loop and litellm; the caller keeps the scheduling (and the global in-flight bound).

    reply, cost_usd = await complete(kwargs, timeout)           # in this process
    reply, cost_usd = await pool.complete(kwargs, timeout)      # in a client process

Both raise `JudgeCallError` (or asyncio.TimeoutError / openai errors in this process) for a
failed call; a client process that dies fails the run with RuntimeError, never a judge failure.
Children are started with `python -m common.judge_client` (not multiprocessing's spawn, which
would re-import the training script and torch) and exit when the parent's socket closes.
"""
from __future__ import annotations

import asyncio
import atexit
import gc
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent

_LITELLM = None
_LITELLM_LOCK = threading.Lock()


class JudgeCallError(Exception):
    """A provider error or timeout reported by a client process ("ErrorType: message")."""


def import_litellm():
    """litellm, imported and configured once per process."""
    global _LITELLM
    if _LITELLM is not None:
        return _LITELLM
    with _LITELLM_LOCK:
        if _LITELLM is None:
            os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"   # use the bundled price map, fetch nothing
            import litellm

            litellm.suppress_debug_info = True
            # Importing litellm leaves ~360k long-lived objects (price map, schemas) in the cyclic
            # GC's care; each full collection during a batch then walks all of them (~0.35 s on a
            # loaded 2-core host), stalling every call in flight on the loop thread. Freezing takes
            # what exists now out of the collector's scans; objects made later are collected as usual.
            gc.collect()
            gc.freeze()
            _LITELLM = litellm
    return _LITELLM


async def complete(kwargs: dict, timeout: float) -> tuple[str, Optional[float]]:
    """One chat completion: (reply text, cost in USD or None when litellm has no price)."""
    litellm = import_litellm()
    response = await asyncio.wait_for(litellm.acompletion(**kwargs, timeout=timeout, max_retries=0), timeout=timeout)
    return response.choices[0].message.content or "", response._hidden_params.get("response_cost")


class _Worker:
    def __init__(self, index: int):
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "common.judge_client", str(child_end.fileno())],
            pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL, env=env,
            # Its own session: a SIGTERM/SIGINT sent to the trainer's process group (torchrun, Ctrl-C) must not
            # kill it before the trainer checkpoints; it exits when the trainer's socket closes.
            start_new_session=True)
        child_end.close()
        self.index = index
        self.conn = Connection(parent_end.detach())
        self.send_lock = threading.Lock()
        self.pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self.dead: Optional[str] = None
        threading.Thread(target=self._read_replies, name=f"judge-client-{index}", daemon=True).start()

    def _read_replies(self) -> None:
        while True:
            try:
                call_id, status, payload = self.conn.recv()
            except (EOFError, OSError):
                break
            entry = self.pending.pop(call_id, None)
            if entry is not None:
                loop, future = entry
                loop.call_soon_threadsafe(_settle, future, status, payload)
        code = self.process.wait()
        self.dead = f"judge client process {self.index} (pid {self.process.pid}) exited with code {code}"
        for loop, future in list(self.pending.values()):
            loop.call_soon_threadsafe(_settle, future, "crash", self.dead)
        self.pending.clear()

    def close(self) -> None:
        try:
            with self.send_lock:
                self.conn.send(None)
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        self.conn.close()


def _settle(future: asyncio.Future, status: str, payload) -> None:
    if future.done():
        return
    if status == "ok":
        future.set_result(payload)
    elif status == "error":
        future.set_exception(JudgeCallError(payload))
    else:
        future.set_exception(RuntimeError(payload))


class ClientProcessPool:
    """`processes` client processes; each call goes to the one with the fewest calls in flight."""

    def __init__(self, processes: int):
        self.workers = [_Worker(i) for i in range(processes)]
        self._ids = itertools.count()

    async def complete(self, kwargs: dict, timeout: float) -> tuple[str, Optional[float]]:
        worker = min(self.workers, key=lambda w: len(w.pending))
        if worker.dead:
            raise RuntimeError(worker.dead)
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        worker.pending[call_id] = (asyncio.get_running_loop(), future)
        try:
            try:
                with worker.send_lock:
                    worker.conn.send((call_id, kwargs, timeout))
            except OSError as err:   # the child died after the check above
                raise RuntimeError(worker.dead or f"judge client process {worker.index} "
                                   f"(pid {worker.process.pid}) is gone: {err}") from err
            # The child times the call out itself; this bound only guards against a stuck child.
            return await asyncio.wait_for(future, timeout + 30)
        finally:
            worker.pending.pop(call_id, None)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


_POOLS: dict[int, ClientProcessPool] = {}
_POOLS_LOCK = threading.Lock()


def client_pool(processes: int) -> ClientProcessPool:
    """The process-wide pool of this size (started once; children import litellm meanwhile)."""
    with _POOLS_LOCK:
        if processes not in _POOLS:
            _POOLS[processes] = ClientProcessPool(processes)
        return _POOLS[processes]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()


# =============================================================================================
# Child side
# =============================================================================================
def _serve(fd: int) -> None:
    # A whole-job signal (SLURM preemption, scancel) reaches this process too; the trainer still needs it until
    # its checkpoint at the step boundary, so it ignores them and exits when the trainer's socket closes.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(fd)
    import_litellm()
    import openai

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    tasks: set[asyncio.Task] = set()

    async def handle(call_id: int, kwargs: dict, timeout: float) -> None:
        try:
            message = (call_id, "ok", await complete(kwargs, timeout))
        except (asyncio.TimeoutError, openai.OpenAIError) as err:   # litellm's errors subclass openai's
            message = (call_id, "error", f"{type(err).__name__}: {err}")
        except Exception:   # a bug, not a provider failure: the parent stops the run with it
            message = (call_id, "crash", "judge client process raised:\n" + traceback.format_exc())
        conn.send(message)

    def read_requests() -> None:   # on the loop: no reader thread, no cross-thread wake-ups
        try:
            while conn.poll():
                item = conn.recv()
                if item is None:
                    loop.stop()
                    return
                task = loop.create_task(handle(*item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (EOFError, OSError):   # the parent is gone
            loop.stop()

    loop.add_reader(conn.fileno(), read_requests)
    loop.run_forever()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
