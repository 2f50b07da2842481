"""The Triton kernels equal the PyTorch path, run on CPU under the Triton interpreter (TRITON_INTERPRET=1)
at small shapes in fp32 and fp16. The interpreter must be switched on before triton is first imported, so the
check runs in a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'vlmfast[gpu]' or a CUDA torch)")

SCRIPT = r"""
import json, torch
from vlmfast.sparse.kernels import sparse_attention, masked_reference
from vlmfast.sparse.layout import video_like, multi_image
from vlmfast.sparse.patterns import AShape, VerticalSlash, Grid, QBoundary, BlockSparse, HeadContext
torch.manual_seed(0)
cases = [("video", video_like(12, 3, 4, 5, 9), Grid(stride="row", phase=2, local=16)),
         ("video", video_like(12, 3, 4, 5, 9), VerticalSlash(vertical=12, slash=12, last_q=8)),
         ("images", multi_image(6, 2, 4, 4, 2, 7), AShape(sink=8, local=16)),
         ("images", multi_image(6, 2, 4, 4, 2, 7), QBoundary(vertical=6, slash=6, last_q=4)),
         ("video", video_like(12, 3, 4, 5, 9), BlockSparse(topk=2))]
out = []
for dtype in (torch.float32, torch.float16):
    for name, lay, pat in cases:
        n, d = lay.n, 16
        q, k, v = torch.randn(2, n, d), torch.randn(1, n, d), torch.randn(1, n, d)
        specs = [pat.build(HeadContext(q[h], k[0], lay, 16, d ** -0.5, {})) for h in range(2)]
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        tri = sparse_attention(qd, kd, vd, specs, d ** -0.5, backend="triton").float()
        ref = sparse_attention(qd.float(), kd.float(), vd.float(), specs, d ** -0.5, backend="torch").float()
        dense = max(float((tri[:, h].double() - masked_reference(qd[h].float(), kd[0].float(), vd[0].float(),
                                                                 specs[h].dense(), d ** -0.5)[0]).abs().max())
                    for h in range(2))
        out.append({"dtype": str(dtype), "case": name + "/" + pat.pattern, "vs_torch": float((tri - ref).abs().max()),
                    "vs_dense": dense})
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_triton_equals_torch_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 10
    for r in results:
        tol = 1e-5 if "float32" in r["dtype"] else 2e-3  # fp16 inputs: the reference is fp32 on fp16-rounded inputs
        assert r["vs_torch"] < tol and r["vs_dense"] < tol, r
