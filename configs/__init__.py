"""Resource package ``moe_tune.presets`` (this folder in the wheel): model presets in ``models/``.

An ``__init__.py`` makes it a regular package: setuptools' editable finder cannot resolve a
namespace package mapped under a regular one (``moe_tune``), so ``importlib.resources`` would miss it.
"""
