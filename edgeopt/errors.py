"""Exceptions raised by edgeopt.

Every error a user can fix (a missing file, a wrong shape, an unknown name) is an
`EdgeoptInputError`. The CLI prints its message on one line and exits with code 2, so each
message names the value at fault and what to do.
"""

from __future__ import annotations


class EdgeoptError(Exception):
    """Base class of every exception edgeopt raises on purpose."""


class EdgeoptInputError(EdgeoptError, ValueError):
    """A user-supplied value (file, data, model, option) is invalid."""


class DataError(EdgeoptInputError):
    """The data cannot be read or does not fit the model."""


class ModelLoadError(EdgeoptInputError):
    """A model file or reference cannot be loaded."""


class TrainingDivergedError(EdgeoptInputError):
    """Training produced a non-finite loss, usually because the learning rate is too high."""


class ConversionError(EdgeoptError):
    """An export or quantization step failed for a model the user supplied."""


class UnsupportedOperatorError(ConversionError, EdgeoptInputError):
    """The model uses an operator the chosen converter cannot translate."""


class VerificationError(EdgeoptError):
    """An exported model disagrees with its source beyond the accepted tolerance."""


class TargetError(EdgeoptInputError):
    """A hardware target is unknown, unavailable or cannot run the model."""


class EdgeoptWarning(UserWarning):
    """Base class of edgeopt's warnings, so a caller can filter the whole family."""


class QuantizationWarning(EdgeoptWarning):
    """A quantized model lost accuracy or speed that the caller should know about."""


class ExportWarning(EdgeoptWarning):
    """An export changed the model in a way that may matter (mode switch, clamped constant)."""
