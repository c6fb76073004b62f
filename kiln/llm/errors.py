"""Typed errors of kiln's LLM path; each names the problem and, where it can, what was expected vs given."""
from __future__ import annotations

from ..errors import KilnError

__all__ = ["UnsupportedConfigError", "ContextLengthError", "BatchSizeError"]


class UnsupportedConfigError(KilnError, NotImplementedError):
    """A transformers config field (or value) that the kiln decoder does not implement.

    Parameters
    ----------
    field : str
        The config field, e.g. ``"sliding_window"``.
    value : object
        Its value in the given config.
    reason : str
        Why kiln refuses it (and what it would accept).
    """

    def __init__(self, field: str, value, reason: str):
        self.field, self.value = field, value
        super().__init__(f"config field {field}={value!r} is not supported: {reason}")


class ContextLengthError(KilnError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the KV cache compiled into the model."""


class BatchSizeError(KilnError, ValueError):
    """A batch size with no compiled decode function, or inputs whose batch sizes disagree."""
