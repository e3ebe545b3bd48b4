#!/usr/bin/env python
"""The accelerator check of `model.kernels=tokamax` (prepared; run it on a lent GPU/TPU):

    python bench/tokamax_check.py [--out bench/tokamax_check_<card>.json]

For each tokamax implementation the backend offers (GPU: mosaic_gpu, triton; TPU: mosaic_tpu; always xla)
and dtype (float32, bfloat16): tokamax_attention.attention vs the flash reference
(`flash_attention.segment_attention`, XLA) on packed rows (3 segments + padding, GQA 8/2 heads, hd 64,
B 4 x T 2048): max relative error of the non-padding outputs and of dq/dk/dv of a loss over them, and the
median forward+backward time of each (and of the Pallas kernel, `pallas_attention`, on GPU). An
implementation that refuses the call (NotImplementedError) is reported with its reason. Expected:
float32 <= 1e-5 relative where the kernel computes in float32 (TF32 / bf16 dots on GPU give ~1e-3: stated
in the row), bfloat16 <= 2e-2.

On the H200 image (Python 3.12, jax 0.11.2) carry the pure-Python wheels: here
`python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl tokamax==0.0.12
qwix==0.1.8 einshape==1.0 jaxtyping==0.3.11 wadler-lindig==0.1.8 typeguard==2.13.3 immutabledict==4.3.1
ml-collections==1.1.0`, then on the device `python3 -m pip install -q --no-index --no-deps --target
/tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python3 bench/tokamax_check.py --out $OUT/tokamax_check.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sft_jax.kernels import flash_attention, pallas_attention, tokamax_attention  # noqa: E402


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _time(fn, *args, reps=10):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    b, t, h, kv, hd = a.batch, a.length, 8, 2, 64
    s1, s2 = t // 3, t // 2
    seg = np.zeros((b, t), np.int32)
    seg[:, :s1], seg[:, s1:s1 + s2], seg[:, s1 + s2:t - 64] = 1, 2, 3
    pos = np.zeros((b, t), np.int32)
    for lo, hi in ((0, s1), (s1, s1 + s2), (s1 + s2, t - 64)):
        pos[:, lo:hi] = np.arange(hi - lo)
    seg_j, pos_j = jnp.asarray(seg), jnp.asarray(pos)
    real = seg > 0
    r = np.random.default_rng(0)
    w = jnp.asarray(r.normal(size=(b, t, h * hd)) * real[..., None], jnp.float32)
    rows = []
    impls = [n for n, _ in tokamax_attention._implementations()]
    print(f"backend {jax.default_backend()} {jax.devices()[0].device_kind}; {tokamax_attention.status()[1]}; "
          f"implementations {impls}; B {b} T {t} H {h}/{kv} hd {hd}", flush=True)
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = (jnp.asarray(r.normal(size=(b, t, n, hd)), dtype) for n in (h, kv, kv))

        def loss_of(fn):
            return jax.jit(jax.value_and_grad(
                lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))

        ref_fn = lambda q, k, v: flash_attention.segment_attention(q, k, v, seg_j, pos_j, dtype=dtype)  # noqa: E731
        ref_out = np.asarray(jax.jit(ref_fn)(q, k, v), np.float32)
        ref_step = loss_of(ref_fn)
        _, ref_g = ref_step(q, k, v)
        rows.append({"impl": "flash (XLA blocks, reference)", "dtype": jnp.dtype(dtype).name,
                     "fwd_bwd_s": _time(ref_step, q, k, v)})
        cands = [(f"tokamax:{n}", (lambda n: lambda q, k, v: tokamax_attention.attention(
            q, k, v, seg_j, pos_j, dtype=dtype, implementation=n))(n)) for n in impls]
        if jax.default_backend() == "gpu":
            cands.append(("pallas (jax mha)", lambda q, k, v: pallas_attention.attention(q, k, v, seg_j, dtype=dtype)))
        for name, fn in cands:
            row = {"impl": name, "dtype": jnp.dtype(dtype).name}
            try:
                out = np.asarray(jax.jit(fn)(q, k, v), np.float32)
                step = loss_of(fn)
                _, g = step(q, k, v)
                row.update(out_rel=_rel(out[real], ref_out[real]),
                           grad_rel=max(_rel(np.asarray(x, np.float32), np.asarray(y, np.float32))
                                        for x, y in zip(g, ref_g)),
                           fwd_bwd_s=_time(step, q, k, v))
            except Exception as e:  # noqa: BLE001 - report and go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
