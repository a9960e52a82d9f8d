"""Evaluate stage: validation/test loss and perplexity of the base and of base + adapter."""
