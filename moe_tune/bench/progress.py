"""The benchmark's progress: the one protocol the sweep also speaks, ``moe_tune.progress`` (``start``
once, ``begin``/``end`` around each timed measurement, ``note``). The names stay importable from
here for the bench modules until they import ``moe_tune.progress`` directly."""

from __future__ import annotations

from moe_tune.progress import NullProgress, Progress, RichProgress

__all__ = ["NullProgress", "Progress", "RichProgress"]
