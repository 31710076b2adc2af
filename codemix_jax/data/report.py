"""The token shares a mixture really delivers, next to the configured ones (`mixture-report`).

A study compares runs whose mixtures differ by a few points, so before spending a pod on one it
pays to read real batches through the configured sources and check what each source contributes.
"""

import dataclasses
import itertools

import numpy as np

from codemix_jax.data.mixture import MixtureInput


@dataclasses.dataclass(frozen=True)
class ShareReport:
    """Per source: target tokens read, and the configured share averaged over the steps read."""

    tokens: dict[str, int]
    configured: dict[str, float]

    @property
    def realized(self) -> dict[str, float]:
        total = sum(self.tokens.values())
        return {name: count / total for name, count in self.tokens.items()}


def mixture_report(mixture: MixtureInput, *, num_batches: int, start_step: int = 0) -> ShareReport:
    """Counts target tokens (segment_ids > 0) per source in batches ``start_step`` onwards.

    Reads as the only host; the batches before ``start_step`` are read and not counted.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    names = mixture.source_names
    tokens = np.zeros(len(names), np.int64)
    batches = mixture.host_batches(process_index=0, process_count=1)
    for batch in itertools.islice(batches, start_step, start_step + num_batches):
        np.add.at(tokens, batch["source_id"], (batch["segment_ids"] > 0).sum(axis=1))
    phases = [mixture.phase_at(step) for step in range(start_step, start_step + num_batches)]
    configured = mixture.share_matrix()[phases].mean(axis=0)
    return ShareReport(
        tokens=dict(zip(names, tokens.tolist(), strict=True)),
        configured={
            name: round(share, 9) for name, share in zip(names, configured.tolist(), strict=True)
        },
    )


def report_json(report: ShareReport) -> dict:
    """Source name -> realized share, plus "configured" and "tokens" (each source name -> value)."""
    return {**report.realized, "configured": report.configured, "tokens": report.tokens}


def report_table(report: ShareReport) -> str:
    """One line per source: tokens, configured and realized share, and their difference."""
    width = max(len("source"), *(len(name) for name in report.tokens))
    lines = [f"{'source':<{width}} {'tokens':>12} {'configured':>10} {'realized':>9} {'diff':>9}"]
    for name, realized in report.realized.items():
        configured = report.configured[name]
        lines.append(
            f"{name:<{width}} {report.tokens[name]:>12,} {configured:>10.2%} {realized:>9.2%} "
            f"{(realized - configured) * 100:>+6.2f} pp"
        )
    lines.append(f"{'total':<{width}} {sum(report.tokens.values()):>12,}")
    return "\n".join(lines)
