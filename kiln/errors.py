"""Typed errors. Every error names the problem and, where it can, what was expected vs given."""
from __future__ import annotations

__all__ = [
    "KilnError", "UnsupportedOpsError", "ToolchainMissingError", "StageInvariantError",
    "ArtifactError", "ArtifactIntegrityError", "SignatureMismatchError", "InputMismatchError",
    "ScheduleFallbackError", "UnknownModelError",
]


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""


class UnsupportedOpsError(KilnError, NotImplementedError):
    """The model uses operators the frontend cannot convert; lists all of them, with counts.

    Parameters
    ----------
    ops : dict[str, int]
        Operator name -> number of occurrences.
    frontend : str
        ``"torch"`` or ``"onnx"``.
    """

    def __init__(self, ops: dict[str, int], frontend: str):
        self.ops = dict(sorted(ops.items()))
        self.frontend = frontend
        listing = ", ".join(f"{k} (x{v})" for k, v in self.ops.items())
        super().__init__(f"{len(self.ops)} unsupported {frontend} operator(s): {listing}")


class ToolchainMissingError(KilnError, RuntimeError):
    """A tool the build needs (nvcc, ld.lld >= 17, ...) is missing or too old."""

    def __init__(self, tool: str, needed_for: str, hint: str = ""):
        self.tool = tool
        msg = f"{tool} is required to {needed_for} but was not found"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class StageInvariantError(KilnError, RuntimeError):
    """An invariant between two compile stages does not hold (e.g. an unscheduled GPU PrimFunc)."""

    def __init__(self, stage: str, problem: str, items=()):
        self.stage, self.items = stage, list(items)
        extra = f": {', '.join(map(str, self.items))}" if self.items else ""
        super().__init__(f"after stage '{stage}': {problem}{extra}")


class ScheduleFallbackError(KilnError, RuntimeError):
    """``strict=True`` compile and a hot op fell back to a generic schedule."""


class ArtifactError(KilnError, OSError):
    """An artifact directory is missing, incomplete or not a kiln artifact."""


class ArtifactIntegrityError(ArtifactError):
    """A file in an artifact does not match the SHA-256 recorded in its manifest."""

    def __init__(self, path: str, expected: str, given: str):
        self.path, self.expected, self.given = path, expected, given
        super().__init__(f"artifact file {path!r} is corrupted: sha256 expected {expected[:16]}…, given {given[:16]}…")


class SignatureMismatchError(ArtifactError):
    """The artifact's manifest signature disagrees with the compiled module or with what the caller expects."""


class InputMismatchError(KilnError, ValueError):
    """Inputs given at run time do not match the compiled signature (count, shape, dtype or device)."""


class UnknownModelError(KilnError, ValueError):
    """A MODEL argument is neither a file, a ``module:factory`` path, nor a zoo name."""


class TuneError(KilnError, ValueError):
    """``kiln.tune`` was given something it cannot tune (samples, modules, backends, strategy), or a
    tuned model cannot be saved as asked."""


class TunedModelMismatchError(ArtifactError):
    """A saved tuning result does not fit the model it is loaded into (module tree, weights or device)."""


__all__ += ["TuneError", "TunedModelMismatchError"]
