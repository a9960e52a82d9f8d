"""The model card (``README.md``) of a trained adapter: its base, the training recipe, the data card's counts, the
run's metrics, the prompt template and how to load it; written by :func:`qtune.model.adapters.finish_adapter`."""

from __future__ import annotations

from pathlib import Path

from qtune.config import FOUR_BIT, RunConfig

SUMMARY_ROWS = (
    ("steps", "steps trained"),
    ("trainable_params", "trainable parameters"),
    ("final_train_loss", "final training loss"),
    ("val_loss", "validation loss (token-weighted)"),
    ("val_perplexity", "validation perplexity"),
    ("wall_time_s", "training time, s"),
)
"""(training summary key, its label) of the metrics a card lists, in order; a key the summary lacks is left out."""


def write_model_card(
    adapter_dir: str | Path, cfg: RunConfig, base: str, note: str, summary: dict, data_card: dict | None
) -> None:
    """Write :func:`model_card` as ``README.md`` in ``adapter_dir`` (replacing PEFT's boilerplate one)."""
    (Path(adapter_dir) / "README.md").write_text(model_card(cfg, base, note, summary, data_card), encoding="utf-8")


def model_card(cfg: RunConfig, base: str, note: str, summary: dict, data_card: dict | None) -> str:
    """The Markdown model card of an adapter trained with ``cfg`` on ``base`` (its public identity; ``note``: where
    its weights came from, or ""), with the metrics of ``summary`` and the counts of ``data_card`` (or None)."""
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [qtune, lora]",
        "---",
        "",
        f"# LoRA adapter for {base}",
        "",
        "Trained with qtune: a frozen, quantized base and a LoRA adapter "
        "(Hu et al. 2021; QLoRA, Dettmers et al. 2023).",
        "",
        "| | |",
        "|---|---|",
        *_recipe_rows(cfg, base, note),
        *_result_rows(summary, data_card),
        "",
        "## Prompt template",
        "",
        *_template_section(cfg.data.template),
        *_loading_section(base),
    ]
    return "\n".join(lines)


def _recipe_rows(cfg: RunConfig, base: str, note: str) -> list[str]:
    """Table rows: the base and its quantization, LoRA's hyper-parameters, the training recipe, the data."""
    q, lo, t, d = cfg.quant, cfg.lora, cfg.train, cfg.data
    data_name = Path(d.path).name if Path(d.path).is_absolute() else d.path  # a file of this machine: by its name
    quant = q.quant + (f", double quantization {'on' if q.double_quant else 'off'}" if q.quant in FOUR_BIT else "")
    return [
        f"| base | `{base}`{' (' + note + ')' if note else ''} |",
        f"| base weights while training | {quant}, compute dtype {q.compute_dtype} |",
        f"| LoRA | r {lo.r}, lora_alpha {lo.lora_alpha}, lora_dropout {lo.lora_dropout}, target_modules "
        f"{lo.target_modules}, init {lo.init} |",
        f"| training | {t.max_steps} steps, batch {t.batch_size} x accumulation {t.gradient_accumulation_steps}, "
        f"lr {t.learning_rate} ({t.lr_scheduler}, {t.warmup_steps} warmup steps), seed {t.seed} |",
        f"| data | `{data_name}`, template {d.template}, max_length {d.max_length} tokens |",
    ]


def _result_rows(summary: dict, data_card: dict | None) -> list[str]:
    """Table rows: the data card's counts (when there is one), then the metrics of :data:`SUMMARY_ROWS`."""
    rows = []
    if data_card:
        dropped = ", ".join(f"{k} {v}" for k, v in data_card.get("dropped", {}).items() if v)
        rows.append(
            f"| data card | {data_card.get('rows_in')} rows in, {data_card.get('rows_kept')} kept"
            f"{' (dropped: ' + dropped + ')' if dropped else ''}; splits {data_card.get('splits')} |"
        )
    rows += [f"| {label} | {summary[key]} |" for key, label in SUMMARY_ROWS if summary.get(key) is not None]
    return rows


def _template_section(template: str) -> list[str]:
    """The prompt format the adapter was trained on: Alpaca's two prompts, or the tokenizer's chat template."""
    from qtune.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    if template == "alpaca":
        return [
            "Alpaca (CodeAlpaca's format); the answer follows `### Response:` and ends with EOS.",
            "",
            "Without an input:",
            "",
            "```",
            ALPACA_NO_INPUT.rstrip("\n"),
            "```",
            "",
            "With an input:",
            "",
            "```",
            ALPACA_WITH_INPUT.rstrip("\n"),
            "```",
        ]
    return [
        "The base tokenizer's own chat template (`tokenizer.apply_chat_template`, with a generation "
        "prompt); the user message is the instruction, then the input after a blank line."
    ]


def _loading_section(base: str) -> list[str]:
    """How to load the adapter onto ``base`` with PEFT and transformers alone."""
    return [
        "",
        "## Loading",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/DIRECTORY")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIRECTORY")',
        "```",
        "",
    ]
