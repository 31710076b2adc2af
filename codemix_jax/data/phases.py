"""Mixture phases laid out over a run's length, so a schedule follows the run's step count.

Paper B's dynamic mixing splits instruction tuning into four equal phases; written in steps, each
run length would need its own phase starts. ``equal_phases`` takes the run's ``num_steps`` (gin:
``%NUM_STEPS``, which ``codemix experiment`` derives from the stage's token budget) instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import gin


@gin.configurable
def equal_phases(
    *, shares: Sequence[Mapping[str, float]], num_steps: int
) -> list[tuple[int, dict[str, float]]]:
    """``MixtureInput.phases`` of ``len(shares)`` phases, as equal in steps as whole steps allow.

    Args:
      shares: each phase's token shares, in order.
      num_steps: the run's length; phase ``i`` starts at batch ``i * num_steps // len(shares)``.
    """
    if not shares:
        raise ValueError("equal_phases needs the shares of at least one phase")
    if num_steps < len(shares):
        raise ValueError(
            f"equal_phases: {len(shares)} phases need at least as many steps, got {num_steps}"
        )
    return [(i * num_steps // len(shares), dict(values)) for i, values in enumerate(shares)]
