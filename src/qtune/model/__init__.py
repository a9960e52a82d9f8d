"""Model stage: resolve and load a LLaMA-family causal LM, quantize it, attach LoRA adapters."""
