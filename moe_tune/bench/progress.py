"""How the benchmark reports progress: ``start(total)`` once, then ``begin(what)`` / ``end()``
around each timed measurement, and ``note(message)`` for what the user should know. ``RichProgress``
draws one bar on stderr (the CLI and the benchmark scripts); library callers pass nothing."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total: int) -> None: ...

    def begin(self, what: str) -> None: ...

    def end(self) -> None: ...

    def note(self, message: str) -> None: ...


class NullProgress:
    def start(self, total: int) -> None:
        pass

    def begin(self, what: str) -> None:
        pass

    def end(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass


class RichProgress:
    """One bar on stderr: measurements done of those planned, the one running, elapsed and ETA."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.task is not None:
            self.progress.update(self.task, description="done" if exc_type is None else "stopped")
            self.progress.stop()

    def start(self, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("starting", total=total)

    def begin(self, what: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=what)

    def end(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def note(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]moe-tune: {escape(message)}[/yellow]", soft_wrap=True)  # one line per note
