"""CAFe losses as small modules with named terms.

Contrastive terms are computed over the *global* batch of pairs. `gather_features` all-gathers
the embeddings and puts the live local tensor back in its own slot, so each rank computes the
full global loss and its backward yields the exact full-batch gradient for its own samples.
Examples without a pair take no part, so ranks may hold different numbers of pairs, or none.
With a world size of 1 no collective call is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Concatenate `local` from every rank in rank order, keeping the autograd graph of this
    rank's rows.

    Ranks may hold different numbers of rows, none included: each shares its count, then its
    rows padded to the largest count (at least one row, so no collective moves an empty
    tensor). Every rank makes the same two calls whatever it holds."""
    if world_size == 1:
        return local
    counts = _gather_counts(local.shape[0], local.device, world_size)
    padded = local.new_zeros((max(1, *counts), *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    slots = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(slots, padded)
    parts = [slot[:count] for slot, count in zip(slots, counts)]
    parts[rank] = local
    return torch.cat(parts, dim=0)


def _gather_counts(count: int, device: torch.device, world_size: int) -> list[int]:
    mine = torch.tensor([count], device=device)
    counts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(counts, mine)
    return [int(c) for c in counts]


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (logits = cosine / temperature) or the pairwise sigmoid variant.

    The temperature is stored as a log logit-scale so a learnable one stays positive."""

    def __init__(self, *, kind: str = "infonce", temperature: float = 0.05, learnable: bool = False,
                 sigmoid_bias: float = -10.0) -> None:
        super().__init__()
        if kind not in ("infonce", "sigmoid"):
            raise ValueError(f"contrastive loss kind {kind!r} is not one of ['infonce', 'sigmoid']")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.kind = kind
        # shape (1,), not a scalar: DeepSpeed's broadcast of 0-dim parameters fails under gloo
        log_scale = torch.tensor([math.log(1.0 / temperature)])
        bias = torch.tensor([sigmoid_bias])
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
            self.bias = nn.Parameter(bias) if kind == "sigmoid" else None
        else:
            self.register_buffer("log_scale", log_scale)
            self.register_buffer("bias", bias if kind == "sigmoid" else None)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale.detach()).sum())

    def forward(self, query: torch.Tensor, target: torch.Tensor, *, param_grad_scale: float = 1.0) -> torch.Tensor:
        """`query` and `target`: (N, D) L2-normalised embeddings, row i of each is a pair.

        `param_grad_scale` multiplies the gradient reaching this module's own (learnable)
        temperature and bias without changing the value."""
        scale = _scale_grad(self.log_scale, param_grad_scale).exp()
        logits = scale * query.float() @ target.float().T
        n = logits.shape[0]
        if n == 0:  # no pair on any rank: zero, and every parameter still gets its (zero) gradient
            return logits.sum() + sum(p.sum() * 0 for p in self.parameters())
        if self.kind == "infonce":
            labels = torch.arange(n, device=logits.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        signs = 2 * torch.eye(n, device=logits.device) - 1
        return -F.logsigmoid(signs * (logits + _scale_grad(self.bias, param_grad_scale))).sum() / n


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` in the forward pass (exactly), `factor` times the gradient in the backward pass."""
    if factor == 1.0:
        return x
    return x.detach() + (x - x.detach()) * factor


@dataclass
class LossTerms:
    """What one CAFe step reports. `objective` is what is back-propagated. (No slots: ZeRO-3's
    forward hooks read module outputs through `vars()`.)"""

    objective: torch.Tensor
    loss: torch.Tensor
    lm_loss: torch.Tensor | None
    con_loss: torch.Tensor | None
    query: torch.Tensor | None = None  # a GradCache chunk's own embeddings (`CafeModel.forward(cached=...)`)
    target: torch.Tensor | None = None
    # the share of this rank's examples in the contrastive term (the rest have no pair); None when it is off
    pair_share: float | None = None


@dataclass
class CachedGrads:
    """GradCache's cached gradients for one chunk (`cafe.gradcache`): d objective / d the chunk's
    query and target embeddings, the factor of the chunk's mean LM loss in the full-batch
    objective, and, on one chunk only, d objective / d each learnable parameter of the loss, by
    name (looked up on the module at use: ZeRO-3 fetches a partitioned parameter on attribute
    access within the engine's forward, not through a reference kept from before). The empty
    default is the first, graph-free pass, which wants only the embeddings."""

    query: torch.Tensor | None = None
    target: torch.Tensor | None = None
    lm: torch.Tensor | float = 0.0
    params: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def surrogate(self, lm_loss: torch.Tensor | None, query: torch.Tensor | None, target: torch.Tensor | None,
                  loss: nn.Module) -> torch.Tensor:
        """Linear in the chunk's outputs (and `loss`'s parameters) with the cached gradients as
        coefficients: its backward gives the chunk's share of the full-batch objective's gradient."""
        params = [(loss.get_parameter(name), g) for name, g in self.params]
        pairs = [(query, self.query), (target, self.target), *params]
        parts = [(x * g).sum().float() for x, g in pairs if g is not None]
        if lm_loss is not None:
            parts.append(self.lm * lm_loss)
        return torch.stack(parts).sum() if parts else torch.zeros(())


class CafeLoss(nn.Module):
    """L = alpha_lm * L_lm + con_weight * L_con, with the reference code's on/off flags."""

    def __init__(self, *, compute_language_loss: bool = True, compute_contrastive_loss: bool = True,
                 alpha_lm: float = 1.0, con_weight: float = 1.0, contrastive: ContrastiveLoss | None = None) -> None:
        super().__init__()
        if not (compute_language_loss or compute_contrastive_loss):
            raise ValueError("at least one of compute_language_loss / compute_contrastive_loss must be on")
        self.compute_language_loss = compute_language_loss
        self.compute_contrastive_loss = compute_contrastive_loss
        self.alpha_lm = alpha_lm
        self.con_weight = con_weight
        self.contrastive = contrastive or ContrastiveLoss()

    def forward(self, *, lm_loss: torch.Tensor | None, query: torch.Tensor | None, target: torch.Tensor | None,
                rank: int = 0, world_size: int = 1, pair_share: float | None = None) -> LossTerms:
        """`query` and `target`: the embeddings of this rank's pairs (examples without one left out)."""
        con = None
        if self.compute_contrastive_loss:
            # one gather for both: row i of each stays a pair
            pairs = gather_features(torch.cat([query, target], dim=1), rank, world_size)
            gathered_query, gathered_target = pairs.split([query.shape[1], target.shape[1]], dim=1)
            # The temperature (and bias) is replicated: each rank already gets its full gradient,
            # so it is divided by world_size here to stay exact after the scaling in `combine`.
            con = self.contrastive(gathered_query, gathered_target, param_grad_scale=1.0 / world_size)
        return self.combine(lm_loss, con, world_size, pair_share=pair_share)

    def combine(self, lm_loss: torch.Tensor | None, con: torch.Tensor | None, world_size: int = 1, *,
                pair_share: float | None = None) -> LossTerms:
        """The weighted terms from values already computed (GradCache reports the full batch this way)."""
        loss = objective = None
        if self.compute_language_loss:
            loss = objective = self.alpha_lm * lm_loss
        if self.compute_contrastive_loss:
            weighted = self.con_weight * con
            # Every rank holds the full global contrastive loss but only its own samples'
            # gradient; data-parallel averaging divides by world_size, so scale it back up.
            loss = weighted if loss is None else loss + weighted
            objective = weighted * world_size if objective is None else objective + weighted * world_size
        return LossTerms(objective=objective, loss=loss, lm_loss=lm_loss, con_loss=con,
                         pair_share=pair_share if self.compute_contrastive_loss else None)
