"""What a person watching a run wants each log interval: throughput, the share of time spent
waiting for input, and an ETA, as MLflow metrics and as one console line."""
from __future__ import annotations

import torch
import torch.distributed as dist

from cafe.logs import clock


class Progress:
    """Accumulates each step's input wait, step time and tokens between log steps. Every rank
    calls `interval_metrics` at the same steps (it all-reduces across ranks)."""

    def __init__(self, total_steps: int, *, samples_per_step: int) -> None:
        self.total_steps, self.samples_per_step = total_steps, samples_per_step
        self.seconds_per_step: float | None = None
        self.truncated_total = 0.0  # sequences cut to data.max_text_tokens, all ranks, whole run
        self.skip_interval()

    def skip_interval(self) -> None:
        """Forget the steps since the last log (e.g. an evaluation or checkpoint ran between them)."""
        self.waited = self.busy = 0.0
        self.tokens = self.steps = self.truncated = 0

    def add(self, *, waited: float, busy: float, tokens: int, truncated: int = 0) -> None:
        self.truncated += truncated
        self.waited += waited
        self.busy += busy
        self.tokens += tokens
        self.steps += 1

    def interval_metrics(self, world: int) -> dict[str, float]:
        totals = torch.tensor([self.waited, self.busy, float(self.tokens), float(self.truncated)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        waited, busy, tokens, truncated = totals.tolist()
        self.truncated_total += truncated
        steps = self.steps
        self.skip_interval()
        if steps == 0 or waited + busy <= 0:
            return {}
        seconds = (waited + busy) / world  # wall time of the interval, averaged over ranks
        self.seconds_per_step = seconds / steps
        return {"train/samples_per_s": steps * self.samples_per_step / seconds, "train/tokens_per_s": tokens / seconds,
                "train/data_wait_fraction": waited / (waited + busy), "train/truncated_in_interval": truncated,
                "train/truncated_sequences": self.truncated_total}

    def line(self, step: int, metrics: dict[str, float]) -> str:
        parts = [f"[train] step {step}/{self.total_steps}", f"loss {metrics['train/loss']:.4f}"]
        parts += [f"{name} {metrics[f'train/{name}_loss']:.4f}" for name in ("lm", "con")
                  if f"train/{name}_loss" in metrics]
        if "train/samples_per_s" in metrics:
            parts += [f"{metrics['train/samples_per_s']:.1f} samples/s", f"{metrics['train/tokens_per_s']:,.0f} tok/s",
                      f"data wait {metrics['train/data_wait_fraction']:.1%}"]
        if metrics.get("train/truncated_in_interval"):
            parts.append(f"{metrics['train/truncated_in_interval']:.0f} sequences cut to data.max_text_tokens "
                         f"({metrics['train/truncated_sequences']:.0f} so far)")
        if self.seconds_per_step is not None:
            parts.append(f"ETA {clock((self.total_steps - step) * self.seconds_per_step)}")
        return " | ".join(parts)
