"""The learning-rate schedule, linear warmup then cosine decay, as a function of the step alone.

A closed form rather than chained schedulers: the factor of step s follows from this run's
settings only, so a resumed run with another horizon (trainer.max_steps) or warmup continues on
the schedule of its new settings instead of replaying the old one past its end, where a cosine
climbs back to its peak. LambdaLR saves no state of a plain function, so a checkpoint cannot
bring the old settings back either.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """step -> learning-rate factor: linear from 1/warmup to 1 over `warmup_steps` steps, then a
    cosine from 1 down to `min_ratio` at `total_steps`, and `min_ratio` after it."""
    total = max(int(total_steps), 1)
    warmup = min(max(int(warmup_steps), 0), total - 1)
    decay = max(total - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return 1.0 / warmup + (1.0 - 1.0 / warmup) * step / warmup
        progress = min(step - warmup, decay) / decay
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
