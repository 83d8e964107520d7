"""The global-batch contrastive loss on two gloo ranks equals the single-process loss on the
concatenated batch: values, gradients of each rank's own rows, and (after data-parallel
averaging of `objective`'s gradients) every parameter gradient, the learnable temperature
included; also when rows without a pair leave the ranks different numbers of pairs, or one rank
none. World size 1 makes no collective call."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cafe.losses import CafeLoss, ContrastiveLoss, gather_features

WORLD = 2
ROWS = 6  # global batch
PER_RANK = ROWS // WORLD
# `unpaired`: global rows without a pair (they still train the 'lm' head)
CASES = {
    "infonce-contrastive-only": dict(kind="infonce", with_lm=False),
    "infonce-with-lm": dict(kind="infonce", with_lm=True),
    "sigmoid-with-lm": dict(kind="sigmoid", with_lm=True),
    "infonce-uneven-pairs": dict(kind="infonce", with_lm=True, unpaired=(1, 2)),
    "sigmoid-rank-without-pairs": dict(kind="sigmoid", with_lm=True, unpaired=(3, 4, 5)),
    "infonce-contrastive-only-rank-without-pairs": dict(kind="infonce", with_lm=False, unpaired=(0, 1, 2)),
}


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "xq": torch.randn(ROWS, 5, generator=g),
        "xt": torch.randn(ROWS, 7, generator=g),
        "xh": torch.randn(ROWS, 5, generator=g),
        "yh": torch.randint(0, 3, (ROWS,), generator=g),
    }


def make_modules(kind: str, with_lm: bool) -> tuple[nn.ModuleDict, CafeLoss]:
    """The same weights on every rank: a query tower, a target tower and an 'lm' head."""
    torch.manual_seed(5)
    towers = nn.ModuleDict({"query": nn.Linear(5, 4), "target": nn.Linear(7, 4), "head": nn.Linear(5, 3)})
    contrastive = ContrastiveLoss(kind=kind, temperature=0.3, learnable=True, sigmoid_bias=-1.0)
    loss = CafeLoss(compute_language_loss=with_lm, alpha_lm=0.6, con_weight=1.3, contrastive=contrastive)
    return towers, loss


def paired_rows(unpaired: tuple[int, ...], rank: int, world_size: int) -> list[int]:
    """This rank's global rows that have a pair."""
    return [i for i in range(rank * ROWS // world_size, (rank + 1) * ROWS // world_size) if i not in unpaired]


def run_case(kind: str, with_lm: bool, rank: int, world_size: int, unpaired: tuple[int, ...] = ()) -> dict:
    """One step on this rank's rows: loss values, d loss / d own features, d objective / d params."""
    towers, loss_fn = make_modules(kind, with_lm)
    rows = slice(rank * ROWS // world_size, (rank + 1) * ROWS // world_size)
    inputs = make_inputs()
    x = {k: v[rows] for k, v in inputs.items()}
    paired = paired_rows(unpaired, rank, world_size)
    q = F.normalize(towers["query"](inputs["xq"][paired]), dim=-1)
    t = F.normalize(towers["target"](inputs["xt"][paired]), dim=-1)
    lm = F.cross_entropy(towers["head"](x["xh"]), x["yh"]) if with_lm else None
    terms = loss_fn(lm_loss=lm, query=q, target=t, rank=rank, world_size=world_size)
    names = [n for n, _ in towers.named_parameters()] + [f"loss.{n}" for n, _ in loss_fn.named_parameters()]
    params = list(towers.parameters()) + list(loss_fn.parameters())
    d_loss = torch.autograd.grad(terms.loss, [q, t], retain_graph=True)
    d_obj_feat = torch.autograd.grad(terms.objective, [q, t], retain_graph=True)
    d_obj = torch.autograd.grad(terms.objective, params, allow_unused=True)
    return {
        "loss": terms.loss.detach(),
        "con_loss": terms.con_loss.detach(),
        "objective": terms.objective.detach(),
        "d_loss_features": [g.detach() for g in d_loss],
        "d_objective_features": [g.detach() for g in d_obj_feat],
        "d_objective_params": {n: (torch.zeros_like(p) if g is None else g.detach())
                               for n, p, g in zip(names, params, d_obj)},
    }


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        # the gather itself: every rank sees the concatenated batch, in rank order
        local = make_inputs()["xq"][rank * PER_RANK : (rank + 1) * PER_RANK].clone().requires_grad_(True)
        gathered = gather_features(local, rank, WORLD)
        assert torch.equal(gathered.detach(), make_inputs()["xq"])
        (g,) = torch.autograd.grad((gathered * torch.arange(1.0, ROWS + 1)[:, None]).sum(), local)
        weights = torch.arange(1.0, ROWS + 1)[rank * PER_RANK : (rank + 1) * PER_RANK, None]
        assert torch.equal(g, weights.expand_as(local))
        # uneven: rank 0 holds two rows, rank 1 none; both join the same calls
        uneven = make_inputs()["xq"][: 2 if rank == 0 else 0].clone().requires_grad_(True)
        gathered = gather_features(uneven, rank, WORLD)
        assert torch.equal(gathered.detach(), make_inputs()["xq"][:2])
        weights = torch.tensor([[1.0], [2.0]])
        (g,) = torch.autograd.grad((gathered * weights).sum(), uneven)
        assert torch.equal(g, weights[: len(uneven)].expand_as(uneven))
        results = {name: run_case(**case, rank=rank, world_size=WORLD) for name, case in CASES.items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(per_rank, case):
    single = run_case(**CASES[case], rank=0, world_size=1)
    ranks = [r[case] for r in per_rank]
    tol = dict(rtol=1e-5, atol=1e-6)
    unpaired = CASES[case].get("unpaired", ())
    every_pair = paired_rows(unpaired, 0, 1)
    # where each rank's pairs sit among the single process's
    own = [[every_pair.index(i) for i in paired_rows(unpaired, rank, WORLD)] for rank in range(WORLD)]

    # every rank computes the full global contrastive loss
    for r in ranks:
        torch.testing.assert_close(r["con_loss"], single["con_loss"], **tol)
    # each rank's lm term is the mean over its own rows; equal row counts make the mean over
    # ranks the global mean, so the reported loss averages to the single-process one
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), single["loss"], **tol)

    # a rank's own pairs get exactly the single-process gradient of the loss ...
    for rank, r in enumerate(ranks):
        for got, want in zip(r["d_loss_features"], single["d_loss_features"]):
            torch.testing.assert_close(got, want[own[rank]], **tol)
    # ... and `objective` scales the contrastive part by the world size (ranks average grads)
    for rank, r in enumerate(ranks):
        for got, want in zip(r["d_objective_features"], single["d_objective_features"]):
            torch.testing.assert_close(got, WORLD * want[own[rank]], **tol)

    # data-parallel averaging of `objective`'s parameter gradients gives the single-process
    # gradient, for the towers and for the loss's own learnable temperature (and bias)
    assert any(name.startswith("loss.") for name in single["d_objective_params"])
    for name, want in single["d_objective_params"].items():
        averaged = torch.stack([r["d_objective_params"][name] for r in ranks]).mean(0)
        if CASES[case]["with_lm"] or not name.startswith("head."):
            assert want.abs().max() > 0, name  # a real gradient, not zeros against zeros
        torch.testing.assert_close(averaged, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_world_size_one_makes_no_collective_call(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("world size 1 must not call a collective")

    monkeypatch.setattr(dist, "all_gather", forbidden)
    monkeypatch.setattr(dist, "all_gather_into_tensor", forbidden)
    x = torch.randn(4, 3)
    assert gather_features(x, 0, 1) is x
    q, t = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 3), dim=-1)
    terms = CafeLoss()(lm_loss=torch.tensor(1.0), query=q, target=t, rank=0, world_size=1)
    assert torch.isfinite(terms.objective)
