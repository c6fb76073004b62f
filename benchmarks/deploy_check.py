"""Deploy path check: artifacts exported on a CPU-only machine run on the GPU with runtime-only TVM.

Two halves:
  python benchmarks/deploy_check.py prepare DIR   # here (nvcc, no GPU): compile zoo models for cuda, export them,
                                                  # save inputs and the torch fp32 reference outputs beside them
  python benchmarks/deploy_check.py check DIR [--json OUT]
                                                  # on the GPU with `pack-tvm --runtime-only`: imports neither kiln
                                                  # nor torch; tvm.runtime.load_module + VirtualMachine + weights
The check half fails if any compiler ran (the CUDA compile callback is replaced by one that raises).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

CASES = [  # (name, zoo model, dtype, batch, dynamic)
    ("bert_tiny_fp16", "bert", "float16", 2, False),
    ("bert_tiny_fp16_dyn", "bert", "float16", 2, True),
    ("resnet50_tiny_fp16", "resnet50", "float16", 2, False),
]


def prepare(root: str) -> None:
    import torch

    import kiln
    from kiln import zoo
    from kiln.verify import torch_reference
    for name, model, dtype, batch, dyn in CASES:
        zm = zoo.get(model, size="tiny", batch=batch)
        art = kiln.compile(zm.model, zm.example_inputs, target="cuda", dtype=dtype,
                           dynamic_shapes=zm.dynamic_shapes if dyn else None)
        out = art.export(os.path.join(root, name))
        ref = torch_reference(zm.model, zm.example_inputs, dtype=torch.float32)
        write_expected(out, zm.example_inputs, ref)
        print(f"prepared {name}: {sorted(os.listdir(out))}", flush=True)


def write_expected(artifact_dir: str, inputs, refs) -> None:
    """Save inputs (floats as float32; cast to the signature's dtype at check time) and reference outputs."""
    import numpy as np
    np.savez(os.path.join(artifact_dir, "expected.npz"),
             **{f"in{i}": (x.float() if x.is_floating_point() else x).cpu().numpy() for i, x in enumerate(inputs)},
             **{f"out{i}": r.double().cpu().numpy() for i, r in enumerate(refs)})


def _no_compiler():
    import tvm_ffi

    def refuse(*args):
        raise RuntimeError("a CUDA compiler was invoked at load time")
    for name in ("tvm_callback_cuda_compile",):
        tvm_ffi.register_global_func(name, refuse, override=True)


def check(root: str, json_out: str | None) -> int:
    import ctypes

    import numpy as np
    import tvm
    tvm_dir = os.path.dirname(tvm.__file__)
    ctypes.CDLL(os.path.join(tvm_dir, "lib", "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)
    from tvm.runtime.vm import VirtualMachine
    _no_compiler()
    # Runtime-only: `pack-tvm --runtime-only`, or TVM_USE_RUNTIME_LIB=1 over the full wheel. Either way the
    # compiler library must not be mapped into this process.
    maps = open("/proc/self/maps").read()
    runtime_only = "libtvm_compiler" not in maps
    rows, ok = [], True
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        man = json.load(open(os.path.join(d, "manifest.json")))
        exp = np.load(os.path.join(d, "expected.npz"))
        dev = tvm.cuda(0)
        t0 = time.perf_counter()
        lib = tvm.runtime.load_module(os.path.join(d, "model.so"))
        vm = VirtualMachine(lib, dev)
        params = tvm.runtime.load_param_dict_from_file(os.path.join(d, "weights.params"))
        load_s = time.perf_counter() - t0
        args = []
        for i, spec in enumerate(man["signature"]["inputs"]):
            args.append(tvm.runtime.tensor(exp[f"in{i}"].astype(spec["dtype"]), dev))
        res = vm["main"](*args, *[params[f"p{i}"].copyto(dev) for i in range(len(params))])
        outs = [res] if hasattr(res, "shape") else list(res)
        err = max(float(np.abs(o.numpy().astype("float64") - exp[f"out{i}"]).max()) for i, o in enumerate(outs))
        mag = max(float(np.abs(exp[f"out{i}"]).max()) for i in range(len(outs)))
        good = np.isfinite(err) and err / mag < 2e-2
        ok &= bool(good)
        rows.append({"artifact": name, "device_code": man["device_code"], "runtime_only": runtime_only,
                     "load_s": round(load_s, 3), "max_abs_err": err, "max_abs_ref": mag, "ok": bool(good)})
        print(f"{name:24s} runtime_only={runtime_only} load {load_s:.2f}s max_err {err:.3g} (|ref| {mag:.3g}) "
              f"{'OK' if good else 'FAILED'}", flush=True)
    runtime_only = "libtvm_compiler" not in open("/proc/self/maps").read()  # still true after loading everything
    for r in rows:
        r["runtime_only"] = r["runtime_only"] and runtime_only
    if json_out:
        json.dump({"tvm": tvm.__version__, "runtime_only": runtime_only, "rows": rows}, open(json_out, "w"), indent=1)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["prepare", "check"])
    p.add_argument("dir")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.mode == "prepare":
        prepare(a.dir)
        return 0
    return check(a.dir, a.json)


if __name__ == "__main__":
    sys.exit(main())
