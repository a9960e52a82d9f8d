"""Study stage: the memory model, the quantization x LoRA sweep and its report."""
