"""kiln: an inference compiler on Apache TVM.

>>> art = kiln.compile(model, (x,), target="cuda")
>>> art.export("out/bert")
>>> m = kiln.load("out/bert", device="cuda")
>>> y = m(x)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import CompiledModel, compile  # noqa: E402
from .errors import (  # noqa: E402
    ArtifactError, ArtifactIntegrityError, InputMismatchError, KilnError, ScheduleFallbackError,
    SignatureMismatchError, StageInvariantError, ToolchainMissingError, UnknownModelError, UnsupportedOpsError,
)
from .signature import Signature, TensorSpec  # noqa: E402
from .target.artifact import load  # noqa: E402

__all__ = [
    "__version__", "compile", "load", "CompiledModel", "Signature", "TensorSpec",
    "KilnError", "UnsupportedOpsError", "ToolchainMissingError", "StageInvariantError", "ScheduleFallbackError",
    "ArtifactError", "ArtifactIntegrityError", "SignatureMismatchError", "InputMismatchError", "UnknownModelError",
]
from . import tune  # noqa: E402  (the package is callable: kiln.tune(model, samples, ...))
from .tune import jit, load_tuned, save  # noqa: E402

__all__ += ["tune", "save", "load_tuned", "jit"]
