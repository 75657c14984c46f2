"""Compile the Gluon grouped GEMM (`kernels/moe_gemm_gluon.py`) for sm_90a on any machine, no GPU needed, and
report ptxas's register count (the launch's; the partitions then set their own) and spills.

    python benchmarks/gluon_xcompile.py [--kinds fp8gu,fp8dn,bf16gu,bf16dn] [--set DYNAMIC=1,HALF=0]
        [--out DIR]

Needs the Triton release the Gluon kernels are written for (`gluon_support.TRITON_TESTED`); torch may be a CPU
build. Each kind is one specialisation at its table tiles (fp8: 128 x 128 x 128, gate/up 4 stages, down 5; bf16:
gate/up 128 x 64 x 4 stages, down 256 x 64 x 3). `--set` overrides the kernel's constexpr flags. The PTX and
ptxas's report go to --out (default /tmp/gluon_xcompile). A compile error or a spill exits non-zero: a kernel
change can be checked here before it spends device time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from xcompile import compile_sm90, ptxas_report  # noqa: E402

from moeserve.kernels import gluon_support, moe_gemm_gluon  # noqa: E402

# kind -> (fp8, gate_up, n, k, block_n, block_k, stages)
KINDS = {
    "fp8gu": (True, True, 14336, 4096, 128, 128, 4),
    "fp8dn": (True, False, 4096, 14336, 128, 128, 5),
    "bf16gu": (False, True, 768, 2048, 128, 64, 4),
    "bf16dn": (False, False, 2048, 768, 256, 64, 3),
}


def compile_kind(kind: str, flags: dict[str, int], out_dir: str) -> str:
    """ptxas's report for one kind (raises on a compile error)."""
    fp8, gate_up, n, k, block_n, block_k, stages = KINDS[kind]
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    rows = 4096
    a = torch.empty(rows, k, dtype=dtype)
    w = torch.empty(8 * (2 * n if gate_up else n), k, dtype=dtype)
    out = torch.empty(rows, n, dtype=torch.float8_e4m3fn if fp8 and gate_up else torch.bfloat16)
    desc = gluon_support.host_descriptor
    ints = torch.empty(rows, dtype=torch.int32)
    f32 = torch.empty(rows, dtype=torch.float32)
    args = dict(a_desc=desc(a, [128, block_k]), a_half_desc=desc(a, [64, block_k]), w_desc=desc(w, [block_n, block_k]),
                out_desc=desc(out, [64, block_n]), SlotOfPair=ints, TopkW=f32, Sorted=ints, BlockExpert=ints,
                BlockRows=ints, AScale=f32, WScale=f32, OutScale=f32, max_blocks=40, num_n=n // block_n,
                k_steps=k // block_k, w_rows=2 * n if gate_up else n, up_off=n if gate_up else 0, top_k=2,
                a_scale_stride=k // 128, ws_e=7, ws_n=3, out_scale_stride=n // 128, Ticket=ints)
    constexprs = dict(GATE_UP=gate_up, STAGES=stages, GROUP_M=8, FP8=fp8, ROUND=gluon_support.gl.bfloat16,
                      HALF=moe_gemm_gluon.HALF_A, DYNAMIC=False)
    constexprs.update({key: type(constexprs[key])(value) for key, value in flags.items()})
    compiled = compile_sm90(moe_gemm_gluon._grouped_gemm_kernel, args, constexprs)
    return ptxas_report(compiled, os.path.join(out_dir, f"{kind}.ptx"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--set", default="", help="integer constexpr overrides, e.g. DYNAMIC=1,HALF=0,GROUP_M=7")
    parser.add_argument("--out", default="/tmp/gluon_xcompile")
    args = parser.parse_args()
    if gluon_support.gluon is None or not triton.__version__.startswith(gluon_support.TRITON_TESTED):
        raise SystemExit(f"gluon_xcompile: the Gluon kernels are written for Triton {gluon_support.TRITON_TESTED}x, "
                         f"this is Triton {triton.__version__}")
    flags = {k: int(v) for k, v in (item.split("=") for item in args.set.split(",") if item)}
    os.makedirs(args.out, exist_ok=True)
    bad = False
    for kind in args.kinds.split(","):
        report = compile_kind(kind, flags, args.out)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill", report)]
        regs = re.findall(r"Used (\d+) registers", report)
        print(f"{kind:7s} registers {regs}  spill bytes {spills}", flush=True)
        bad |= any(spills)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
