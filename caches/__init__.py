"""Pre-tuned caches shipped inside the wheel, as the resource package ``moe_tune.shipped_caches``.

Files here are named ``<device-slug>__triton-<version>.json`` (see ``moe_tune.cache.paths``) and
are read by ``moe_tune.runtime`` through ``importlib.resources`` after the user's own caches.
This ``__init__`` makes the folder a regular package: setuptools' editable finder cannot import a
namespace package mapped under a regular one (``moe_tune``), so without it the shipped layer
would silently vanish in development installs.
"""
