"""Export a trained run: the adapter merged into a 16-bit copy of the base (safetensors).

The base is loaded again in fp16 or bf16 (never the 4-bit or 8-bit weights the adapter may have been trained
against: merging into quantized weights would round the update away), the adapter is loaded with PEFT and
folded in with ``merge_and_unload``. The output directory loads with plain ``AutoModelForCausalLM`` and with
``qtune chat/serve --run OUT`` (``qtune.json`` records the template).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qtune.errors import QtuneError
from qtune.serve.engine import MERGED_META

MERGE_DTYPES = ("fp16", "bf16")


def export_merged(run_dir: str | Path, out: str | Path, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Merge the run's adapter into a 16-bit base and save it (safetensors, tokenizer, ``qtune.json``).

    Args:
        run_dir: a run directory with a trained adapter.
        out: output directory; must be absent or empty unless ``overwrite``.
        dtype: "fp16" or "bf16", the weight dtype of the merged model.

    Returns:
        The output directory.

    Raises:
        QtuneError: no adapter in ``run_dir``, ``out`` not empty, or an unknown dtype.
    """
    from peft import PeftModel

    from qtune.config import QuantConfig, load_config
    from qtune.model.load import load_model, load_tokenizer, resolve_model
    from qtune.rundir import RunDir

    if dtype not in MERGE_DTYPES:
        raise QtuneError(f"--dtype {dtype!r}: expected one of {', '.join(MERGE_DTYPES)}")
    rd = RunDir(Path(run_dir)).require_adapter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise QtuneError(f"{out}: output directory exists and is not empty; pass --overwrite or choose another")
        shutil.rmtree(out)
    cfg = load_config(rd.config)
    base = load_model(resolve_model(cfg.model), cfg.model, QuantConfig(quant=dtype))
    merged = PeftModel.from_pretrained(base, str(rd.adapter)).merge_and_unload()
    merged.eval()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(str(rd.adapter), cfg.model).save_pretrained(str(out))
    meta = {"template": cfg.data.template, "dtype": dtype, "source_run": str(rd.root.resolve()),
            "base_model": cfg.model.name, "trained_quant": cfg.quant.quant,
            "lora": {"r": cfg.lora.r, "lora_alpha": cfg.lora.lora_alpha}}
    (out / MERGED_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out
