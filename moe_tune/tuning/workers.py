"""Worker processes, so that a candidate that crashes or hangs costs that candidate, not the sweep.

Data flow: the sweep (parent) sends one request at a time (``protocol``) over a pipe to a
``spawn``-started process that holds a ``candidate.Bench``; the worker answers with a plain dict. The parent waits at
most the request's timeout:

* an answer → returned as is (``ok`` true or false: a candidate that merely fails — a compile
  error, a wrong result — is an ordinary answer);
* no answer in time (a hung kernel) → the process is killed, the answer is a failure with
  ``failure: "timeout"``, and the next request starts a fresh worker;
* the pipe closes (the process died: a segfault, an abort, a GPU fault the driver turned into an
  exit) → a failure with ``failure: "crashed"`` and the exit code, and a fresh worker next time;
* an answer flagged ``fatal`` (a sticky CUDA error left the context unusable) → returned, and the
  worker, which exits by itself, is replaced on the next request.

``spawn``, not ``fork``: a forked child would inherit the parent's CUDA state, which CUDA does
not support, and a fresh interpreter also picks up ``TRITON_INTERPRET`` from the environment.
``bench`` (default ``candidate.Bench``) is what the worker builds to answer requests: a picklable
callable, so a subclass (the tests' crashing, hanging or wrong candidates) travels to the child.

``WorkerPool`` runs N such workers behind ``submit(request) -> Future`` (one thread per worker
waiting on its pipe): the sweep compiles candidates ahead of timing on the CPU cores with it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence

from moe_tune.errors import MoeTuneError

_SPAWN = multiprocessing.get_context("spawn")

# Importing torch and triton, and creating a CUDA context, takes 5-20 s on a busy 16-core host.
DEFAULT_START_TIMEOUT_S = 300.0


class WorkerStartError(MoeTuneError):
    """A worker process could not start (import failure, no device): nothing can be measured."""


def _serve(conn, bench_factory: Callable[[], Any] | None, env: Mapping[str, str] | None = None) -> None:
    """The worker process's main loop. ``env`` is applied before torch is imported (a timing
    worker's ``CUDA_VISIBLE_DEVICES`` pins it to one GPU, which it then sees as device 0)."""
    os.environ.update(env or {})
    try:
        from moe_tune.tuning.candidate import Bench

        bench = (bench_factory or Bench)()
    except BaseException as exc:  # report why, whatever it was, then exit
        conn.send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    conn.send({"ready": True, "pid": os.getpid()})
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if request is None:
            return
        try:
            reply = bench.handle(request)
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
        if reply.get("fatal"):
            os._exit(3)


class WorkerProcess:
    """One worker process, restarted on demand after a crash or a timeout."""

    def __init__(self, *, bench: Callable[[], Any] | None = None,
                 start_timeout: float = DEFAULT_START_TIMEOUT_S, name: str = "moe-tune-worker",
                 env: Mapping[str, str] | None = None):
        self.bench = bench
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.name = name
        self.starts = 0
        self._proc = None
        self._conn = None
        self._broken: str | None = None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> None:
        if self._broken is not None:
            raise WorkerStartError(self._broken)
        self._discard()
        parent_conn, child_conn = _SPAWN.Pipe()
        proc = _SPAWN.Process(target=_serve, args=(child_conn, self.bench, self.env), name=self.name, daemon=True)
        proc.start()
        child_conn.close()
        self._proc, self._conn = proc, parent_conn
        self.starts += 1
        if not parent_conn.poll(self.start_timeout):
            self._kill()
            self._broken = f"{self.name} did not start within {self.start_timeout:g} s"
            raise WorkerStartError(self._broken)
        try:
            hello = parent_conn.recv()
        except (EOFError, OSError):
            code = self._reap()
            self._broken = f"{self.name} exited with code {code} while starting"
            raise WorkerStartError(self._broken) from None
        if not hello.get("ready"):
            self._reap()
            self._broken = f"{self.name} could not start: {hello.get('error')}"
            raise WorkerStartError(self._broken)

    def call(self, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``request``, wait at most ``timeout`` seconds for the answer (see the module
        docstring for what a crash or a hang returns)."""
        if not self.alive():
            self.start()
        try:
            self._conn.send(dict(request))
        except (BrokenPipeError, OSError):
            code = self._reap()
            return {"ok": False, "failure": "crashed", "error": f"worker died (exit code {code}) before the request"}
        if not self._conn.poll(timeout):
            self._kill()
            return {"ok": False, "failure": "timeout",
                    "error": f"no answer within {timeout:g} s (hung); the worker was killed and restarted"}
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            code = self._reap()
            return {"ok": False, "failure": "crashed",
                    "error": f"the worker died (exit code {code}) on this candidate and was restarted"}
        if reply.get("fatal"):
            self._reap()
        return reply

    def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(5)
        self._kill()

    # -- process bookkeeping ----------------------------------------------------------------------

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        self._reap()

    def _reap(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        proc.join(10)
        code = proc.exitcode
        self._discard()
        return code

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            try:
                self._proc.close()
            except ValueError:  # still running (join timed out): leave it to the OS
                pass
        self._proc = self._conn = None


class WorkerPool:
    """``size`` workers behind ``submit``; each starts at once, in parallel.
    Worker ``i`` runs with ``envs[i % len(envs)]`` (the sweep spreads its compile workers' CUDA
    contexts over the GPUs it times on)."""

    def __init__(self, size: int, *, bench: Callable[[], Any] | None = None,
                 start_timeout: float = DEFAULT_START_TIMEOUT_S, name: str = "moe-tune-compile",
                 envs: Sequence[Mapping[str, str]] = ()):
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        self._jobs: queue.Queue = queue.Queue()
        self.workers = [WorkerProcess(bench=bench, start_timeout=start_timeout, name=f"{name}-{i}",
                                      env=envs[i % len(envs)] if envs else None)
                        for i in range(size)]
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True, name=w.name)
                         for w in self.workers]
        for thread in self._threads:
            thread.start()

    def submit(self, request: Mapping[str, Any], timeout: float) -> Future:
        future: Future = Future()
        self._jobs.put((dict(request), timeout, future))
        return future

    def _run(self, worker: WorkerProcess) -> None:
        try:  # start now, not on the first job: importing torch and a CUDA context take seconds
            worker.start()
        except WorkerStartError:
            pass  # remembered by the worker: every job it takes fails with the reason
        while True:
            job = self._jobs.get()
            if job is None:
                break
            request, timeout, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(worker.call(request, timeout))
            except BaseException as exc:  # WorkerStartError: every later job of this worker fails fast
                future.set_exception(exc)
        worker.close()

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    def close(self, cancel_pending: bool = True) -> None:
        if cancel_pending:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[2].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
