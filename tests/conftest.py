import os

import pytest


def _has_gpu() -> bool:
    try:
        import torch
        if not torch.cuda.is_available():
            return False
        import tvm
        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu); none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Progress output would interleave with pytest's (module-scoped fixtures compile before any function fixture).
os.environ["KILN_PROGRESS"] = "0"
