"""Data stage: load CodeAlpaca-format rows, clean them, format, tokenize with prompt masking, split."""
