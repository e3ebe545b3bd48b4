"""Load benchmark of `python -m sft_jax.serve`: N concurrent clients vs one request at a time.

    python bench/serve_load.py [--requests=32] [--concurrency=8] [--max_tokens=64] [--hidden=256 --layers=4]
        [--out=bench/serve_load.json]

Builds a small random chatml Llama (HF directory in a temp dir: the project's offline BPE tokenizer,
vocab ~400) and sends the same fixed set of requests (random token-id prompts of 8-48 tokens, greedy, up
to `max_tokens` each; a row may stop early at the end token, so tokens are counted from `usage`) with the
`openai` client to the server CLI in a subprocess on 127.0.0.1 (it warms up before listening): one at a
time to a `--max_batch=1` server (the baseline), then one at a time and from N threads to a
`--max_batch=N` server.
Reports completed requests, completion tokens/s, p50/p99 request latency and wall time per mode, and
the speed-up; writes the JSON to --out and prints a table (recorded in bench/serve_load.txt).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import openai

from sft_jax.data.templates import prepare_tokenizer
from sft_jax.data.testing import tiny_fast_tokenizer
from sft_jax.models import llama
from sft_jax.models.config import ModelConfig
from sft_jax.models.hf_io import save_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(path: str, hidden: int, layers: int) -> ModelConfig:
    tok, _ = prepare_tokenizer(tiny_fast_tokenizer(400), "chatml", add_tokens=True)
    mc = ModelConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                     num_layers=layers, num_heads=max(1, hidden // 64), num_kv_heads=max(1, hidden // 128),
                     max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_hf(path, mc, llama.init_params(mc, jax.random.PRNGKey(0)))
    tok.save_pretrained(path)
    return mc


def run_mode(client, prompts, max_tokens: int, workers: int) -> dict:
    lat, tokens, errors = [], 0, 0

    def one(p):
        t = time.perf_counter()
        r = client.completions.create(model="bench", prompt=p, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - t, r.usage.completion_tokens

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
        for f in [ex.submit(one, p) for p in prompts]:
            try:
                dt, n = f.result()
            except openai.APIError as e:
                errors += 1
                print(f"request failed: {e}", file=sys.stderr)
                continue
            lat.append(dt)
            tokens += n
    wall = time.perf_counter() - t0
    return {"concurrency": workers, "completed": len(lat), "errors": errors, "completion_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3) if lat else None,
            "latency_p99_s": round(float(np.percentile(lat, 99)), 3) if lat else None}


def start_server(model_dir: str, max_batch: int, max_queue: int):
    """The server CLI in a subprocess (warm-up done when it answers) -> (process, client, startup s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sft_jax.serve", f"--model={model_dir}", f"--port={port}", "--max_model_len=128",
           f"--max_batch={max_batch}", f"--max_queue={max_queue}", "--log_level=warning", "--served_model_name=bench"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    while True:
        try:
            client.models.list()
            return proc, client, time.perf_counter() - t0
        except openai.APIConnectionError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            time.sleep(0.5)


def stop_server(proc) -> None:
    proc.terminate()
    proc.wait(120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "serve_load.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(4, 398, size=int(rng.integers(8, 48))).tolist() for _ in range(args.requests)]
    names = ["one at a time, --max_batch=1", f"one at a time, --max_batch={args.concurrency}",
             f"{args.concurrency} concurrent clients"]
    modes, startup = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "bench")
        mc = make_model(model_dir, args.hidden, args.layers)
        for max_batch, workers_list in ((1, [1]), (args.concurrency, [1, args.concurrency])):
            proc, client, startup[max_batch] = start_server(model_dir, max_batch, args.requests)
            try:
                run_mode(client, prompts[:2], args.max_tokens, 1)  # connection + first-request warm-up
                for workers in workers_list:
                    modes.append({"max_batch": max_batch, **run_mode(client, prompts, args.max_tokens, workers)})
            finally:
                stop_server(proc)
    base, conc = modes[0], modes[-1]
    result = {
        "model": {"hidden": mc.hidden_size, "layers": mc.num_layers, "heads": mc.num_heads,
                  "kv_heads": mc.num_kv_heads, "vocab": mc.vocab_size},
        "requests": args.requests, "max_tokens": args.max_tokens,
        "server_startup_s": {str(k): round(v, 1) for k, v in startup.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "load_average": os.getloadavg()},
        "modes": [{"name": n, **m} for n, m in zip(names, modes)],
        "speedup_tokens_per_s": round(conc["tokens_per_s"] / base["tokens_per_s"], 2),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"model hidden={mc.hidden_size} layers={mc.num_layers} vocab={mc.vocab_size}; {args.requests} requests x "
          f"max_tokens={args.max_tokens} (greedy); server start + warm-up "
          f"{', '.join(f'{v:.0f}s (max_batch {k})' for k, v in startup.items())}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<34}{'done':>6}{'err':>5}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}")
    for m, name in zip(modes, names):
        print(f"{name:<34}{m['completed']:>6}{m['errors']:>5}{m['completion_tokens']:>8}{m['wall_s']:>9.2f}"
              f"{m['tokens_per_s']:>9.1f}{m['latency_p50_s']:>8.2f}{m['latency_p99_s']:>8.2f}")
    print(f"speed-up (tokens/s) of {args.concurrency} concurrent clients over one at a time on a --max_batch=1 "
          f"server: {result['speedup_tokens_per_s']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
