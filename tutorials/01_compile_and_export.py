# %% [markdown]
# # Compile, export and deploy a model with kiln
#
# This tutorial compiles a small BERT from kiln's zoo, looks at what each compile stage did, exports a deployable
# artifact, and runs it twice: through `kiln.load` and through plain TVM with no kiln at all. It runs on a CPU
# (target `llvm`); on a machine with an H200 the same code with `target="cuda"` builds sm_90a cubin.

# %%
import json
import os
import tempfile

import torch

import kiln
from kiln import zoo
from kiln.verify import compare, torch_reference

target = "cuda" if torch.cuda.is_available() else "llvm"
dtype = "float16" if target == "cuda" else "float32"
zm = zoo.get("bert", size="tiny", batch=2)
print(zm.description)

# %% [markdown]
# ## Compile
# `kiln.compile` runs the stages `import → cleanup → fusion → schedule → lower → codegen`, checks invariants between
# them, and (with `dump_ir`) writes the IR after each one.

# %%
work = tempfile.mkdtemp(prefix="kiln-tutorial-")
art = kiln.compile(zm.model, zm.example_inputs, target=target, dtype=dtype, dump_ir=os.path.join(work, "ir"))
print({stage: f"{seconds:.2f}s" for stage, seconds in art.timings.items()})
print(sorted(os.listdir(os.path.join(work, "ir"))))
print("importer fixes applied:", art.notes)

# %% [markdown]
# ## Export and reload
# The artifact is a directory: the compiled library, the weights, and a manifest with versions, target, signature
# and a SHA-256 for every file. `kiln.load` verifies all of it.

# %%
path = art.export(os.path.join(work, "bert"))
manifest = json.load(open(os.path.join(path, "manifest.json")))
print(manifest["target"], manifest["signature"]["inputs"], sep="\n")
m = kiln.load(path)
device = "cuda" if target == "cuda" else "cpu"
inputs = tuple(x.to(device) for x in zm.example_inputs)
out = m(*inputs)
err = compare(out, torch_reference(zm.model, zm.example_inputs, dtype=torch.float32))
print(err)
assert err["rel_err"] <= kiln.verify.TOLERANCES[dtype]

# %% [markdown]
# Wrong inputs are refused with the expected and the given value:

# %%
try:
    m(inputs[0][:, :7])
except kiln.InputMismatchError as e:
    print("refused:", e)

# %% [markdown]
# ## Run it with plain TVM
# The library needs nothing from kiln: `tvm.runtime.load_module`, the Relax VM and the weights file are enough
# (TVM's runtime-only build works too).

# %%
import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402

dev = tvm.cuda() if target == "cuda" else tvm.cpu()
lib = tvm.runtime.load_module(os.path.join(path, "model.so"))
vm = VirtualMachine(lib, dev)
params = tvm.runtime.load_param_dict_from_file(os.path.join(path, "weights.params"))
outs = vm["main"](tvm.runtime.tensor(zm.example_inputs[0].numpy(), dev),
                  *[params[f"p{i}"].copyto(dev) for i in range(len(params))])
print("plain TVM output:", outs[0].shape, "same as kiln:",
      bool((torch.from_numpy(outs[0].numpy()).float() - out[0].cpu().float()).abs().max() == 0))
