"""Training budgets in tokens, the papers' unit (200B, 40B), turned into whole optimizer steps.

A step trains ``global_batch_size x seq_len`` tokens. A budget is rounded to the nearest whole
step and the tokens actually trained are reported next to the ones asked for.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Budget:
    """``tokens`` asked for, and the whole ``steps`` of ``tokens_per_step`` that train them."""

    tokens: float
    tokens_per_step: int
    steps: int

    @property
    def trained_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def derivation(self) -> str:
        """'200B / 4,194,304 tokens per step = 47,684 steps (200,001,191,936 tokens, +0.0006%)'."""
        off = f", {self.trained_tokens / self.tokens - 1:+.4%}" if self.tokens else ""
        return (
            f"{short_tokens(self.tokens)} / {self.tokens_per_step:,} tokens per step = "
            f"{self.steps:,} steps ({self.trained_tokens:,} tokens{off})"
        )


def short_tokens(tokens: float) -> str:
    """200e9 -> '200B', 1.2288e6 -> '1.2288M': token counts as the papers write them."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(tokens) >= size:
            return f"{tokens / size:.6g}{unit}"
    return f"{tokens:.6g}"


def token_budget(tokens: float, *, tokens_per_step: int, what: str) -> Budget:
    """The whole steps nearest to ``tokens``; less than one batch is refused, naming ``what``."""
    if tokens_per_step < 1:
        raise ValueError(f"{what}: tokens per step must be >= 1, got {tokens_per_step}")
    if not tokens >= tokens_per_step:  # also refuses NaN
        raise ValueError(
            f"{what}: {tokens:,.0f} tokens is less than one batch of {tokens_per_step:,} tokens"
        )
    return Budget(tokens, tokens_per_step, _nearest_steps(tokens, tokens_per_step))


def warmup_budget(tokens: float, *, tokens_per_step: int, what: str) -> Budget:
    """Warmup steps nearest to ``tokens``; zero is allowed, a negative budget is not."""
    if not tokens >= 0:
        raise ValueError(f"{what}: warmup tokens must be >= 0, got {tokens}")
    return Budget(tokens, tokens_per_step, _nearest_steps(tokens, tokens_per_step))


def _nearest_steps(tokens: float, tokens_per_step: int) -> int:
    return int(tokens / tokens_per_step + 0.5)
