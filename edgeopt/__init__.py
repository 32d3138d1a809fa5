"""edgeopt: shrink trained neural networks for phones and small devices."""

from __future__ import annotations

from importlib import metadata as _metadata

from edgeopt import _logging  # noqa: F401  (attaches the NullHandler)

try:
    __version__ = _metadata.version("edgeopt")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from edgeopt.errors import (
    ConversionError,
    DataError,
    EdgeoptError,
    EdgeoptInputError,
    EdgeoptWarning,
    ModelLoadError,
    TargetError,
    VerificationError,
)

__all__ = [
    "ConversionError",
    "DataError",
    "EdgeoptError",
    "EdgeoptInputError",
    "EdgeoptWarning",
    "ModelLoadError",
    "OptimizeConfig",
    "OptimizeResult",
    "TargetError",
    "VerificationError",
    "__version__",
    "optimize",
]


_LAZY = {
    "OptimizeConfig": "edgeopt.pipeline",
    "OptimizeResult": "edgeopt.pipeline",
    "optimize": "edgeopt.pipeline",
}


def __getattr__(name: str) -> object:
    # The pipeline imports torch; loading it on first use keeps `import edgeopt` and
    # `edgeopt --version` fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeopt' has no attribute {name!r}")
