"""`ContrastiveLoss` and `CafeLoss` against float64 computations written here from the formulas
(symmetric InfoNCE over logits = cosine / temperature; the pairwise sigmoid loss), values and
gradients, on seeded random inputs."""
import math

import pytest
import torch

from cafe.losses import CafeLoss, ContrastiveLoss


def unit_rows(generator: torch.Generator, n: int, dim: int) -> torch.Tensor:
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def reference_infonce(q: torch.Tensor, t: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """mean(CE over rows, CE over columns) with logits = exp(log_scale) * q t^T, by hand."""
    logits = torch.exp(log_scale) * (q @ t.T)
    diag = torch.diagonal(logits)
    rows = (torch.logsumexp(logits, dim=1) - diag).mean()
    cols = (torch.logsumexp(logits, dim=0) - diag).mean()
    return (rows + cols) / 2


def reference_sigmoid(q: torch.Tensor, t: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """-sum_ij log sigmoid(z_ij (scale cos_ij + bias)) / N, z = +1 on the diagonal, -1 off it."""
    n = q.shape[0]
    z = -torch.ones(n, n, dtype=torch.float64)
    z.fill_diagonal_(1.0)
    x = z * (torch.exp(log_scale) * (q @ t.T) + bias)
    return -torch.log(1 / (1 + torch.exp(-x))).sum() / n


def reference(kind, q, t, log_scale, bias):
    return reference_infonce(q, t, log_scale) if kind == "infonce" else reference_sigmoid(q, t, log_scale, bias)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.05, 0.7])
def test_contrastive_loss_value_and_gradients_match_float64_formula(kind, learnable, n, temperature):
    g = torch.Generator().manual_seed(1000 * n + int(100 * temperature) + (kind == "sigmoid"))
    q64, t64 = unit_rows(g, n, 12), unit_rows(g, n, 12)
    module = ContrastiveLoss(kind=kind, temperature=temperature, learnable=learnable, sigmoid_bias=-3.0)
    assert module.temperature == pytest.approx(temperature, rel=1e-6)

    q = q64.float().requires_grad_(True)
    t = t64.float().requires_grad_(True)
    loss = module(q, t)
    assert loss.dtype == torch.float32 and loss.shape == ()
    own_params = list(module.parameters())
    grads = torch.autograd.grad(loss, [q, t] + own_params)

    rq = q64.clone().requires_grad_(True)
    rt = t64.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / temperature), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    expected = reference(kind, rq, rt, log_scale, bias)
    ref_grads = torch.autograd.grad(expected, [rq, rt, log_scale, bias], allow_unused=True)

    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    for got, want in zip(grads[:2], ref_grads[:2]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    if learnable:
        # the log-scale (and, for sigmoid, the bias) are trained; their gradients match too
        assert len(own_params) == (2 if kind == "sigmoid" else 1)
        assert own_params[0] is module.log_scale
        for got, want in zip(grads[2:], ref_grads[2:]):
            assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    else:
        assert own_params == []  # a fixed temperature is a buffer, never in the optimiser


def test_infonce_is_symmetric_and_rewards_aligned_pairs():
    g = torch.Generator().manual_seed(3)
    q, t = unit_rows(g, 8, 16).float(), unit_rows(g, 8, 16).float()
    loss = ContrastiveLoss(kind="infonce", temperature=0.1)
    assert loss(q, t).item() == pytest.approx(loss(t, q).item(), rel=1e-6)
    # identical query and target make the diagonal the largest entry of every row and column
    assert loss(q, q).item() < loss(q, t).item()


def test_default_temperature_is_the_reference_scale_of_20():
    loss = ContrastiveLoss()
    assert loss.kind == "infonce"
    assert torch.exp(loss.log_scale).item() == pytest.approx(20.0, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_non_positive_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=temperature)


def test_unknown_kind_raises_listing_the_kinds():
    with pytest.raises(ValueError, match="infonce.*sigmoid"):
        ContrastiveLoss(kind="triplet")


def test_cafe_loss_combines_named_terms():
    g = torch.Generator().manual_seed(7)
    q, t = unit_rows(g, 6, 8).float().requires_grad_(True), unit_rows(g, 6, 8).float()
    lm = torch.tensor(2.5, requires_grad=True)
    contrastive = ContrastiveLoss(temperature=0.2)
    terms = CafeLoss(alpha_lm=0.3, con_weight=1.7, contrastive=contrastive)(lm_loss=lm, query=q, target=t)
    con = contrastive(q, t)
    assert terms.con_loss.item() == pytest.approx(con.item(), rel=1e-6)
    assert terms.lm_loss is lm
    assert terms.loss.item() == pytest.approx(0.3 * 2.5 + 1.7 * con.item(), rel=1e-6)
    assert terms.objective.item() == pytest.approx(terms.loss.item(), rel=1e-6)  # world size 1
    d_lm, d_q = torch.autograd.grad(terms.objective, [lm, q])
    assert d_lm.item() == pytest.approx(0.3)
    torch.testing.assert_close(d_q, 1.7 * torch.autograd.grad(con, q)[0])


def test_language_loss_off_leaves_only_the_contrastive_term():
    g = torch.Generator().manual_seed(8)
    q, t = unit_rows(g, 4, 8).float(), unit_rows(g, 4, 8).float()
    contrastive = ContrastiveLoss(temperature=0.5)
    loss = CafeLoss(compute_language_loss=False, con_weight=0.4, contrastive=contrastive)
    terms = loss(lm_loss=None, query=q, target=t)
    assert terms.loss.item() == pytest.approx(0.4 * contrastive(q, t).item(), rel=1e-6)
    # an lm value handed in anyway does not enter the loss
    assert loss(lm_loss=torch.tensor(1e6), query=q, target=t).loss.item() == pytest.approx(terms.loss.item())


def test_contrastive_loss_off_leaves_only_the_language_term():
    terms = CafeLoss(compute_contrastive_loss=False, alpha_lm=2.0)(lm_loss=torch.tensor(1.25), query=None, target=None)
    assert terms.con_loss is None
    assert terms.loss.item() == pytest.approx(2.5)
    assert terms.objective.item() == pytest.approx(2.5)


def test_both_terms_off_raises():
    with pytest.raises(ValueError, match="compute_language_loss"):
        CafeLoss(compute_language_loss=False, compute_contrastive_loss=False)


def test_param_grad_scale_keeps_the_value_and_scales_only_the_temperature_gradient():
    g = torch.Generator().manual_seed(9)
    q, t = unit_rows(g, 5, 8).float().requires_grad_(True), unit_rows(g, 5, 8).float()
    module = ContrastiveLoss(kind="sigmoid", temperature=0.2, learnable=True)
    plain = module(q, t)
    scaled = module(q, t, param_grad_scale=0.25)
    assert scaled.item() == plain.item()
    d_plain = torch.autograd.grad(plain, [q, module.log_scale, module.bias])
    d_scaled = torch.autograd.grad(scaled, [q, module.log_scale, module.bias])
    torch.testing.assert_close(d_scaled[0], d_plain[0])
    torch.testing.assert_close(d_scaled[1], 0.25 * d_plain[1])
    torch.testing.assert_close(d_scaled[2], 0.25 * d_plain[2])


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_no_pairs_give_zero_and_a_zero_gradient_for_every_parameter(kind):
    """A step whose batch holds no pair on any rank: the term is zero, not NaN, and the learnable
    temperature (and bias) still get their gradient, so every rank's optimizer sees the same parameters."""
    module = ContrastiveLoss(kind=kind, learnable=True)
    q, t = torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8, requires_grad=True)
    loss = module(q, t)
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, [q, t, *module.parameters()])
    assert all(g is not None and not g.any() for g in grads)
