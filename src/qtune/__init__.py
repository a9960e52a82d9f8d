"""qtune: quantize a LLaMA-family model, fine-tune LoRA adapters on it, measure and serve the result."""

__version__ = "0.1.0"
