"""Every fine-tuning method answers every export format: it writes the format or refuses with a reason.

For each method of `sft_jax.peft.METHODS` (default `peft.*` fields) on the real stories260K base (converted
from ../shared), the method's own trees (`Method.init`, no training) go through each exporter of
`sft_jax.export.FORMATS` (`export_<format>`, what `python -m sft_jax.export --format=<format>` calls). Each
either writes its files or raises an error the CLI reports as one line with exit 2 (`cli.exit_code`), whose
message gives a reason; anything else (a traceback, a silent empty directory) fails. GGUF is written from the
merged export: a method without a merge refuses it for the same reason. `EXPECTED` pins which formats each
method has (README "Method presets" lists the same; a format not in this tree's FORMATS is not asked for).
"""

from __future__ import annotations

import os
import shutil

import jax
import pytest

from sft_jax import cli, export, peft
from sft_jax.config import default_config
from sft_jax.models import hf_io
from sft_jax.workdir import Run

# the formats each method writes (the others it refuses); a method not listed here is checked for
# "writes or refuses with a reason" only
EXPECTED = {
    "full": {"merged", "gguf"},
    "lora": {"merged", "peft", "gguf", "adapter"},
    "dora": {"merged", "peft", "gguf", "adapter"},
    "pissa": {"merged", "peft", "gguf", "adapter"},
    "qlora": {"merged", "peft", "gguf", "adapter"},
    "qdora": {"merged", "peft", "gguf", "adapter"},
    "ia3": {"merged", "peft", "gguf", "adapter"},
    "prompt_tuning": {"peft", "adapter"},
    "p_tuning": {"peft", "adapter"},
    "prefix_tuning": {"peft", "adapter"},
    "bitfit": {"merged", "gguf", "adapter"},
    "bottleneck": {"adapter"},
}
# what a written format must contain
WRITES = {"merged": ("config.json", ".safetensors"), "peft": ("adapter_config.json",), "gguf": (".gguf",),
          "adapter": ("sft_jax_adapter.json", ".safetensors")}


@pytest.fixture(scope="module")
def base(shared_dir, tmp_path_factory):
    """stories260K as a Hugging Face directory, and a directory with only its tokenizer files (what a
    work directory's tokenizer/ holds)."""
    from sft_jax.models.llama2c import convert_llama2c

    root = tmp_path_factory.mktemp("method_exports")
    model = root / "stories260K"
    convert_llama2c(str(shared_dir / "assets/stories260K/stories260K.bin"),
                    str(shared_dir / "assets/stories260K/tok512.model"), str(model))
    tok = root / "tokenizer"
    tok.mkdir()
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copyfile(model / name, tok / name)
    return str(model), str(tok)


def _run(name: str, model: str, tok: str) -> Run:
    cfg = default_config()
    cfg.peft.method = name
    method = peft.from_config(cfg.peft)
    model_config, params = hf_io.load_hf(model, transform=method.load_transform(), param_dtype="float32",
                                         dtype="float32")
    trainable, frozen = method.init(params, model_config, jax.random.PRNGKey(0))
    return Run(config_dict=cfg.to_dict(), model_config=model_config, frozen=frozen, trainable=trainable,
               method=method, tokenizer=None, eos_ids=[2], step=0, base_model=model, tokenizer_path=tok)


@pytest.mark.parametrize("name", sorted(peft.METHODS))
def test_every_export_format_is_written_or_refused_with_a_reason(name, base, tmp_path):
    run = _run(name, *base)
    written, refused = set(), {}
    for fmt in export.FORMATS:
        exporter = getattr(export, f"export_{fmt}", None)
        assert exporter is not None, f"sft_jax/export.py has no export_{fmt} for --format={fmt}"
        out = tmp_path / fmt
        try:
            exporter(run, str(out))
        except Exception as e:  # noqa: BLE001 - the point: which kind of error
            assert cli.exit_code(e) == cli.EXIT_BAD_INPUT, (
                f"{name} --format={fmt}: {type(e).__name__} is not a refusal the CLI reports in one line: {e}")
            reason = cli.message(e)
            assert len(reason) >= 25 and "\n" not in reason, f"{name} --format={fmt}: reason {reason!r}"
            refused[fmt] = (type(e), reason)
            continue
        files = os.listdir(out)
        for suffix in WRITES.get(fmt, ("",)):
            assert any(f.endswith(suffix) for f in files), f"{name} --format={fmt} wrote {files}, no *{suffix}"
        written.add(fmt)
    assert written | set(refused) == set(export.FORMATS)
    if "merged" in refused and "gguf" in refused:  # GGUF is written from the merged export: the same reason
        assert refused["gguf"] == refused["merged"], (name, refused)
    assert not ("gguf" in written and "merged" in refused), (name, written, refused)
    if name in EXPECTED:
        assert written == EXPECTED[name] & set(export.FORMATS), (name, written, {f: r for f, (_, r) in refused.items()})
