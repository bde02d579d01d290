"""The one progress protocol (moe_tune/progress.py) that the sweep and the benchmark both speak: one
bar for a single-task caller (the benchmark), one per task for the sweep's problems, plans that
grow when a task takes more steps than planned, and finished tasks that end full."""

from __future__ import annotations

from moe_tune.progress import NullProgress, Progress, RichProgress


def bars(progress: RichProgress) -> dict[str, tuple[float, float]]:
    return {t.description: (t.completed, t.total) for t in progress.progress.tasks}


def drive(progress: Progress) -> None:
    progress.start(3)  # the benchmark: one task, exact plan, a description per step
    for i in range(3):
        progress.begin(f"step {i}")
        progress.end()
    progress.start(2, task="up", label="  up forward")  # the sweep: a task per problem, estimated plans
    progress.start(5, task="down", label="down dx     ")
    for _ in range(4):
        progress.end(task="up")
    progress.finish(task="up")
    progress.end(task="down")
    progress.note("a [bold]note[/bold] with markup-like text")


def test_bars_count_steps_per_task(capsys):
    with RichProgress() as progress:
        drive(progress)
        assert bars(progress)["step 2"] == (3, 3)
    assert bars(progress) == {"done": (3, 3), "  up forward": (4, 4), "down dx     ": (1, 5)}
    assert "a [bold]note[/bold] with markup-like text" in capsys.readouterr().err  # printed as is


def test_null_progress_takes_the_same_calls():
    drive(NullProgress())
