"""Compile targets (cuda sm_90a, rocm gfx942, llvm host CPU) and the build/export glue for each.

Typical use::

    t = resolve_target("cuda")
    check_toolchain(t)
    with t.schedule_target:
        mod = dl.ApplyDefaultSchedule(...)(mod)
    with build_context(t):
        ex = tvm.relax.build(mod, t.tvm_target, tir_pipeline=tir_pipeline(t))
    info = export_library(ex, "model.so", t)
"""
from .targets import (
    TARGET_NAMES,
    KilnTarget,
    build_context,
    check_toolchain,
    device_code,
    export_library,
    resolve_target,
    tir_pipeline,
)

__all__ = [
    "KilnTarget",
    "TARGET_NAMES",
    "resolve_target",
    "check_toolchain",
    "build_context",
    "tir_pipeline",
    "export_library",
    "device_code",
]
