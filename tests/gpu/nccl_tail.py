"""Out-of-place ncclAllReduce on one rank, through CuPy's NCCL bindings (the same libnccl.so.2
as xkd loads): is every element of the output written, for Avg and Sum, odd and even lengths,
aligned and not? The output starts as NaN; on one rank the result must equal the input.
Prints the rows where it does not; exits 1 if a Sum (what xkd's NCCL collective uses) misses
an element. tests/gpu/check.sh runs it; tests/gpu/RESULTS.md has what NCCL 2.28.9 did.
"""
import sys

import cupy as cp
from cupy.cuda import nccl
print("NCCL", nccl.get_version())
comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
stream = cp.cuda.Stream(non_blocking=True)
ops = {"avg": getattr(nccl, "NCCL_AVG", 4), "sum": nccl.NCCL_SUM}
print("| op | count | src offset | elements not equal to the input |")
print("|---|---:|---:|---|")
checked = failed_sum = 0
for name, op in ops.items():
    for n in [1, 2, 3, 4, 5, 7, 8, 9, 1023, 236032, 236033, 236035, 1000001]:
        for off in [0, 1]:
            big = cp.random.standard_normal(n + off, dtype=cp.float32)
            src = big[off:]
            dst = cp.full(n, cp.nan, dtype=cp.float32)
            comm.allReduce(src.data.ptr, dst.data.ptr, n, nccl.NCCL_FLOAT32, op, stream.ptr)
            stream.synchronize()
            bad = cp.nonzero(~(dst == src))[0].get()
            checked += 1
            if len(bad):
                failed_sum += name == "sum"
                print(f"| {name} | {n} | {off} | {len(bad)}: first {bad[:4].tolist()} |")
print(f"{checked} cases; the rows above are those with an element not written")
sys.exit(1 if failed_sum else 0)
