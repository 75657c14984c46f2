"""Compile a Triton or Gluon kernel for the H100 (sm_90a) on a machine without a GPU, as a launch would.

What only the GPU's compile shows (registers, spills, shared memory, whether the loads were pipelined) can be
read here before a kernel spends device time. Needs the GPU box's Triton (3.6, on the local wheel index) in a
venv with a CPU torch; see docs/architecture.md ("Kernel work without a GPU"). Used by `gluon_xcompile.py` and
`decode_layer_probe.py --xcompile`.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess

import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

try:  # Gluon kernels need their own source type (Triton >= 3.5)
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
except ImportError:  # pragma: no cover - older Triton
    GluonASTSource = GluonJITFunction = None


def compile_sm90(kernel, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int | None = None):
    """kernel (a `triton.jit` or `gluon.jit` function) compiled for sm_90a with the signature and attributes a
    launch with `args` (CPU tensors stand in for device ones; host TMA descriptors as they are) would give it:
    without the 16-byte divisibility of pointers and strides the code has no vector loads and no pipelined
    copies, and looks worse than what runs. constexprs: the kernel's constexpr arguments by name."""
    names = kernel.arg_names
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name not in args:
            signature[name] = "constexpr"
            continue
        ty, attr = native_specialize_impl(BaseBackend, args[name], False, name not in kernel.do_not_specialize, True)
        signature[name] = ty
        if isinstance(attr, str):
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    source = GluonASTSource if GluonJITFunction is not None and isinstance(kernel, GluonJITFunction) else ASTSource
    src = source(kernel, signature, {(names.index(key),): value for key, value in constexprs.items()}, attrs)
    options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(compiled, ptx_path: str) -> str:
    """ptxas's `-v` report on the kernel's PTX (written to ptx_path); raises on a ptxas error."""
    with open(ptx_path, "w") as f:
        f.write(compiled.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    res = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ptxas failed on {ptx_path}:\n{res.stderr[-2000:]}")
    return res.stderr


def summary(compiled, report: str) -> dict:
    """Registers and spill bytes (ptxas), shared memory, the code's bytes (a persistent kernel whose code
    outgrows the instruction cache, about 120 KB, slows down: benchmarks/RESULTS.md, session 29), and the
    TTGIR's asynchronous copies (pipelined pointer loads), TMA loads and wgmma ops."""
    ttgir = compiled.asm["ttgir"]
    return dict(registers=[int(r) for r in re.findall(r"Used (\d+) registers", report)],
                spill_bytes=[int(x) for x in re.findall(r"(\d+) bytes spill", report)],
                shared=compiled.metadata.shared, code_bytes=code_bytes(compiled.asm["cubin"]),
                async_copies=ttgir.count("async_copy_global_to_local"),
                tma_loads=ttgir.count("async_tma_copy_global_to_local") + ttgir.count("descriptor_load"),
                wgmma=ttgir.count("warp_group_dot"))


def code_bytes(cubin: bytes) -> int:
    """The size of the cubin's code (its `.text` sections; the cubin is a 64-bit ELF)."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    strtab = headers[names][4]

    def name(h) -> bytes:
        start = strtab + h[0]
        return cubin[start:cubin.index(b"\0", start)]

    return sum(h[5] for h in headers if name(h).startswith(b".text"))
