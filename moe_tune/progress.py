"""How long-running commands report progress: the sweep (one bar per problem, measured from several
threads at once) and the benchmark (one bar) speak the same protocol.

A progress has tasks, each named by a hashable ``task`` (``None``: the one task of a caller with
a single bar): ``start(total, task=, label=)`` once per task, ``begin(what, task=)`` when a step
starts (optional: it names the step on the bar), ``end(task=)`` when a step is done,
``finish(task=)`` when the task has no more steps (however many it planned), and
``note(message)`` for what the user should know. ``RichProgress`` draws the bars on stderr (the
CLI and the benchmark scripts); library callers pass nothing and get ``NullProgress``.
"""

from __future__ import annotations

import threading
from typing import Hashable, Protocol


class Progress(Protocol):
    def start(self, total: int, *, task: Hashable = None, label: str = "") -> None: ...

    def begin(self, what: str, *, task: Hashable = None) -> None: ...

    def end(self, *, task: Hashable = None) -> None: ...

    def finish(self, *, task: Hashable = None) -> None: ...

    def note(self, message: str) -> None: ...


class NullProgress:
    def start(self, total: int, *, task: Hashable = None, label: str = "") -> None:
        pass

    def begin(self, what: str, *, task: Hashable = None) -> None:
        pass

    def end(self, *, task: Hashable = None) -> None:
        pass

    def finish(self, *, task: Hashable = None) -> None:
        pass

    def note(self, message: str) -> None:
        pass


class RichProgress:
    """One bar per task on stderr: steps done of those planned, the step running (``begin``),
    elapsed time and ETA. The bars appear with the first ``start``, so an error before it leaves
    stderr a single line."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self._ids: dict[Hashable, int] = {}
        self._stepping: set[Hashable] = set()  # tasks whose description names the running step
        self._finished: set[Hashable] = set()
        self._lock = threading.Lock()  # the sweep's lanes report from their own threads
        self._started = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        with self._lock:
            for task in self._stepping:
                self.progress.update(self._ids[task], description="done" if exc_type is None else "stopped")
            if self._started:
                self.progress.stop()

    def start(self, total: int, *, task: Hashable = None, label: str = "") -> None:
        with self._lock:
            if not self._started:
                self.progress.start()
                self._started = True
            self._ids[task] = self.progress.add_task(label or "starting", total=total)

    def begin(self, what: str, *, task: Hashable = None) -> None:
        with self._lock:
            task_id = self._ids.get(task)
            if task_id is not None:
                self._stepping.add(task)
                self.progress.update(task_id, description=what)

    def end(self, *, task: Hashable = None) -> None:
        with self._lock:
            task_id = self._ids.get(task)
            if task_id is None:
                return
            bar = self.progress.tasks[self._index(task_id)]
            if task not in self._finished and bar.total is not None and bar.completed + 1 > bar.total:
                # More steps than planned (the sweep's plans are estimates): grow rather than sit at 100%.
                self.progress.update(task_id, total=bar.completed + 2)
            self.progress.advance(task_id)

    def finish(self, *, task: Hashable = None) -> None:
        with self._lock:
            task_id = self._ids.get(task)
            if task_id is not None:
                self._finished.add(task)
                bar = self.progress.tasks[self._index(task_id)]
                self.progress.update(task_id, total=bar.completed)

    def note(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]moe-tune: {escape(message)}[/yellow]", soft_wrap=True)  # one line per note

    def _index(self, task_id: int) -> int:
        return next(i for i, t in enumerate(self.progress.tasks) if t.id == task_id)
