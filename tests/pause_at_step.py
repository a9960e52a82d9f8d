"""``python -m qtune.cli ARGS...`` with training held still at the end of one optimizer step: a fixed point to kill
the process at, so a test kills it in the same state on every machine, however fast or slow training runs.

Usage: ``python pause_at_step.py STEP FD ARGS...``. Every ``transformers.Trainer`` the command builds gets a callback
that, at the end of optimizer step STEP (before that step is logged or checkpointed), writes ``paused STEP`` and a
newline to the inherited file descriptor FD and then sleeps until the process is killed.
"""

import os
import runpy
import sys
import time

from transformers import Trainer, TrainerCallback


class PauseAt(TrainerCallback):
    def __init__(self, step: int, fd: int):
        self.step, self.fd = step, fd

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.write(self.fd, f"paused {self.step}\n".encode())
            while True:
                time.sleep(60)


def main() -> None:
    step, fd, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    build = Trainer.__init__

    def build_with_pause(self, *a, **k):
        build(self, *a, **k)
        self.add_callback(PauseAt(step, fd))

    Trainer.__init__ = build_with_pause  # type: ignore[method-assign]
    sys.argv = [sys.argv[0], *args]
    runpy.run_module("qtune.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
