"""Decode speed: KV-cache generation (`sampling.generate`) vs recomputing the whole sequence per token.

    python bench/decode_speed.py [--new_tokens=128] [--prompt_len=16] [--batches=1,8] [--repeats=3]

Same tiny random Llama, same prompts, greedy, in one process:
* `kv_cache`: `sft_jax.sampling.generate` (prefill once, then a jitted one-token step in a while_loop);
* `no_cache`: the best-case baseline -- one jitted `fori_loop` that runs the full forward over the
  fixed [B, prompt+new] buffer for every new token (static shapes, compiled once) and takes the
  argmax at the current position;
* `no_cache_py` (batch 1 only): `sampling.generate_no_cache`, the test reference (python loop).
Tokens/s = batch * new tokens / wall seconds (median of --repeats, after a compile/warm-up run).
Both paths must produce the same tokens (checked).  Writes nothing; redirect the output into
bench/decode_speed.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sft_jax.models import llama  # noqa: E402
from sft_jax.models.config import ModelConfig  # noqa: E402
from sft_jax.sampling import generate, generate_no_cache  # noqa: E402


def no_cache_batched(params, config, prompt_len: int, new_tokens: int):
    total = prompt_len + new_tokens

    @jax.jit
    def run(ids):  # ids [B, prompt_len]
        b = ids.shape[0]
        buf = jnp.zeros((b, total), jnp.int32).at[:, :prompt_len].set(ids)
        pos = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (b, total))

        def body(i, buf):
            cur = prompt_len + i  # tokens 0..cur-1 are real
            seg = (pos < cur).astype(jnp.int32)
            logits = llama.forward(params, config, buf, jnp.where(seg > 0, pos, 0), seg)
            nxt = jnp.argmax(logits[:, cur - 1, :], axis=-1).astype(jnp.int32)
            return buf.at[:, cur].set(nxt)

        return jax.lax.fori_loop(0, new_tokens, body, buf)[:, prompt_len:]

    return run


def timed(fn, repeats):
    out = fn()  # compile / warm up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return out, statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    config = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=512)
    params = llama.init_params(config, jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"# decode speed, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus visible, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; load: {uptime}")
    print(f"# model: tiny llama {n_params / 1e6:.2f}M params (hidden 128, 4 layers, 4/2 heads, vocab 512), f32; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, median of {args.repeats}")
    print(f"{'batch':>5} {'method':>12} {'seconds':>9} {'tokens/s':>10} {'speedup':>8}")
    rng = np.random.default_rng(0)
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = rng.integers(3, 512, size=(b, args.prompt_len)).astype(np.int32)
        cached, t_c = timed(lambda: generate(params, config, prompts.tolist(), max_new_tokens=args.new_tokens),
                            args.repeats)
        nc = no_cache_batched(params, config, args.prompt_len, args.new_tokens)
        ref, t_n = timed(lambda: np.asarray(nc(jnp.asarray(prompts))), args.repeats)
        same = [list(r) for r in ref.tolist()] == cached
        toks = b * args.new_tokens
        print(f"{b:>5} {'kv_cache':>12} {t_c:9.3f} {toks / t_c:10.1f} {t_n / t_c:7.1f}x")
        print(f"{b:>5} {'no_cache':>12} {t_n:9.3f} {toks / t_n:10.1f} {1.0:7.1f}x   same tokens: {same}")
        if b == 1:
            _, t_p = timed(lambda: generate_no_cache(params, config, prompts[0].tolist(),
                                                     max_new_tokens=args.new_tokens), 1)
            print(f"{b:>5} {'no_cache_py':>12} {t_p:9.3f} {toks / t_p:10.1f} {t_n / t_p:7.1f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
