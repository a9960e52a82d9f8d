"""``python -m qtune.cli``: the ``qtune`` command (what ``torchrun`` and ``accelerate launch`` start per process)."""

from qtune.cli import main

main()
