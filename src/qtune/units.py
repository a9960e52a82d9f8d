"""Byte units, defined once: memory figures are in GiB (2**30 bytes), sizes of files and buffers in MiB."""

MIB = 1024**2
"""Bytes in a mebibyte."""
GIB = 1024**3
"""Bytes in a gibibyte."""
