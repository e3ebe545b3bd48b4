#!/usr/bin/env python
"""One attention layer, forward and forward+backward: the native CPU kernel vs the XLA implementation.

    python bench/attention_kernel.py [--shape B,T,H,KV,hd] [--reps 7]

Both compute the same attention (`sft_jax.kernels.flash_attention.segment_attention`, the XLA block loops,
and `sft_jax.kernels.native_attention.attention`, the C++ kernel) on the same packed batch (two examples per row, 2/3 + 1/3 of
the slots, like LIMA at T 512) in float32 and bfloat16; the timed calls alternate between the two so that a
drifting machine affects both alike. Prints median ms per call and the ratio, and checks that the two agree.
Default shape: the 31M benchmark model's layer (B 8, T 512, 8 heads, 4 KV heads, head dim 64).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8,512,8,4,64")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args(argv)
    b, t, h, kv, hd = (int(x) for x in a.shape.split(","))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sft_jax.kernels import flash_attention as A
    from sft_jax.kernels import native_attention as N

    assert N.available(), N._state.get("error")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"# bench/attention_kernel.py --shape {a.shape} --reps {a.reps}")
    print(f"# machine: nproc={os.cpu_count()} cpu={cpu} load={[f'{x:.2f}' for x in os.getloadavg()]}")
    print(f"# jax {jax.__version__}  date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rng = np.random.default_rng(0)
    seg = np.ones((b, t), np.int32)
    cut = t * 2 // 3
    seg[:, cut:] = 2
    pos = np.concatenate([np.arange(cut), np.arange(t - cut)])[None].repeat(b, 0).astype(np.int32)
    print("dtype     what       xla ms  native ms  native/xla  max|diff|/max")
    for dtype in (jnp.float32, jnp.bfloat16):
        q = jnp.asarray(rng.standard_normal((b, t, h, hd)), dtype)
        k = jnp.asarray(rng.standard_normal((b, t, kv, hd)), dtype)
        v = jnp.asarray(rng.standard_normal((b, t, kv, hd)), dtype)
        do = jnp.asarray(rng.standard_normal((b, t, h * hd)), dtype)
        fns = {}
        for name, attn in (("xla", A.segment_attention), ("native", N.attention)):
            f = jax.jit(lambda q, k, v, attn=attn: attn(q, k, v, seg, pos, dtype=dtype))
            g = jax.jit(jax.grad(lambda q, k, v, attn=attn: jnp.sum((attn(q, k, v, seg, pos, dtype=dtype)
                                                                     * do).astype(jnp.float32)), argnums=(0, 1, 2)))
            outs = (jax.block_until_ready(f(q, k, v)), jax.block_until_ready(g(q, k, v)))  # compile
            fns[name] = (f, g, outs)
        times = {n: ([], []) for n in fns}
        for _ in range(a.reps):
            for n, (f, g, _) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(q, k, v))
                t1 = time.perf_counter()
                jax.block_until_ready(g(q, k, v))
                times[n][0].append(t1 - t0)
                times[n][1].append(time.perf_counter() - t1)
        ref, nat = fns["xla"][2], fns["native"][2]
        for i, what in enumerate(("fwd", "fwd+bwd")):
            tx, tn = (1e3 * float(np.median(times[n][i])) for n in ("xla", "native"))
            pairs = [(ref[0], nat[0])] if i == 0 else list(zip(ref[1], nat[1]))
            err = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                      / (float(jnp.max(jnp.abs(x.astype(jnp.float32)))) + 1e-9) for x, y in pairs)
            print(f"{jnp.dtype(dtype).name:9s} {what:8s} {tx:8.1f} {tn:10.1f} {tn / tx:11.2f}  {err:.1e}")


if __name__ == "__main__":
    main()
