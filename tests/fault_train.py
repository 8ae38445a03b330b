"""torchrun entry point of the distributed fault test: `sharded-mde` with one rank SIGKILLed at a chosen step.

FAULT_KILL_RANK and FAULT_KILL_STEP name the victim and the step; it kills itself only on torchrun's
first attempt (TORCHELASTIC_RESTART_COUNT 0), so the restarted group runs to the end. Every attempt
prints what it resumed from and its first step, so the test can tell a resume from a restart at step
0. The hook lives here, not in the package: the package has no test-only code paths.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Dict, Optional

from sharded_mde.cli import main
from sharded_mde.train.trainer import Trainer

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))
KILL_STEP = int(os.environ.get("FAULT_KILL_STEP", "0"))  # 0: no kill
KILL_RANK = int(os.environ.get("FAULT_KILL_RANK", "1"))


def log(msg: str) -> None:
    """One `[fault]` line on stderr in a single write, so the two ranks' lines never interleave."""
    os.write(2, f"[fault] attempt={ATTEMPT} rank={RANK} {msg}\n".encode())


class FaultCallback:
    """A Trainer callback that logs the attempt's first step and SIGKILLs this rank at KILL_STEP."""

    def __init__(self) -> None:
        self.first_step: Optional[int] = None

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if self.first_step is None:
            self.first_step = step
            log(f"first_step={step}")
        if ATTEMPT == 0 and RANK == KILL_RANK and step == KILL_STEP:
            log(f"sigkill_at={step}")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_eval(self, trainer: Trainer, step: int, metrics: Dict[str, float]) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def install() -> None:
    """Adds the callback to every Trainer and logs each resume (patches this process only)."""
    init, resume = Trainer.__init__, Trainer.try_resume

    def patched_init(self: Trainer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.callbacks.append(FaultCallback())

    def patched_resume(self: Trainer) -> bool:
        resumed = resume(self)
        log(f"resumed={resumed} step={self.step}")
        return resumed

    Trainer.__init__ = patched_init  # type: ignore[method-assign]
    Trainer.try_resume = patched_resume  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    sys.exit(main())
