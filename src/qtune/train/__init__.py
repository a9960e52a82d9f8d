"""Train stage: build transformers' Trainer from a RunConfig, record per-step metrics, save the adapter."""
