"""edgeopt: shrink trained neural networks for phones and small devices."""

from __future__ import annotations

from importlib import metadata as _metadata

from edgeopt import _logging  # noqa: F401  (attaches the NullHandler)

try:
    __version__ = _metadata.version("edgeopt")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
