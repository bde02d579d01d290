"""The package version, in a module of its own: the cache records it with every write, the CLI
prints it, and pyproject reads it for the distribution's version, none of them needing the rest of
the package."""

__version__ = "0.1.0"
