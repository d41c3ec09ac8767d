"""UniFace's unified cross-entropy (``head.objective=uniface``) against a reference written from
the formula (Zhou et al., ICCV 2023, with the clamp of the authors' ``head.py``):

    L = mean_i [ log(1 + exp(-clip(s*psi(cos_iy) - b))) + lam * sum_{j != y} log(1 + exp(clip(s*cos_ij - b))) ]

``clip`` to [-s, s], ``b`` initialised to log(10 * C * r). The reference below is plain per-row
float64 autograd; psi is each paper's target function with the target replaced without autograd
(d psi / d cos = 1, ``grad=detached``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facemargin.heads import MarginHead, PartialFCHead, UniFace
from facemargin.heads.objectives import build_objective

C, D = 7, 6
#: (margin, parameters, psi(cos) from the paper): UniFace's setting (CosFace, m = 0.4) and the
#: ExpFace authors' (m = 0.69)
MARGINS = {
    "cosface": ({"m": 0.4}, lambda c: c - 0.4),
    "expface": ({"m": 0.69}, lambda c: torch.cos(math.pi * (torch.acos(c.clamp(-1, 1)) / math.pi) ** 0.69)),
}


def reference_loss(x, w, labels, psi, s, b, lam):
    """Per-row sums from the formula, then the mean over labelled rows."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    terms = []
    for i, y in enumerate(labels.tolist()):
        if y < 0:
            continue
        target = cos[i, y] + (psi(cos[i, y]) - cos[i, y]).detach()  # detached margin
        pos = torch.log1p(torch.exp(-torch.clamp(s * target - b, -s, s)))
        others = torch.cat([cos[i, :y], cos[i, y + 1:]])
        neg = torch.log1p(torch.exp(torch.clamp(s * others - b, -s, s))).sum()
        terms.append(pos + lam * neg)
    return torch.stack(terms).mean()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, D, generator=g, dtype=torch.float64) * 3
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    w[2] = x[0] + 0.05 * w[2]  # some targets close, so positive terms fall inside the clamp
    w[4] = x[3] + 0.05 * w[4]
    labels = torch.tensor([2, 1, -1, 4, 0, 6, 6, 3, -1])
    return x, w, labels


@pytest.mark.parametrize("lam", [1.0, 0.3])
@pytest.mark.parametrize("bias", [None, 40.0, -70.0])  # default init; clamp active for many entries
@pytest.mark.parametrize("name", sorted(MARGINS))
def test_loss_and_gradients_match_the_formula(name, bias, lam) -> None:
    params, psi = MARGINS[name]
    x, w, labels = batch()
    head = MarginHead(D, C, margin=name, objective="uniface", objective_params={"lam": lam}, **params).double()
    with torch.no_grad():
        head.weight.copy_(w)
        if bias is not None:
            head.objective.bias.fill_(bias)
    b0 = head.objective.bias.item()  # the float32 init, cast to float64
    assert b0 == pytest.approx(math.log(10 * C) if bias is None else bias, rel=1e-7)
    xh = x.clone().requires_grad_()
    out = head.output(xh, labels)
    out.loss.backward()

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    ref = reference_loss(xr, wr, labels, psi, head.margin.s, br, lam)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(xh.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.objective.bias.grad, br.grad, rtol=1e-10, atol=1e-12)
    assert set(out.logs) == {"uce", "uniface_b"} and out.logs["uniface_b"].item() == pytest.approx(b0)
    if bias == -70.0:  # s*cos - b >= 6 everywhere: negatives inside the clamp only where cos <= -0.09
        assert (head.weight.grad != 0).any()


def test_clamp_cuts_the_gradient_outside_minus_s_to_s() -> None:
    """A target with s*psi - b < -s contributes log(1 + e^s) and no gradient (the authors' clamp)."""
    obj = UniFace(num_classes=3, s=10.0)
    logits = torch.tensor([[-50.0, 0.0, 3.0]], requires_grad=True)
    with torch.no_grad():
        obj.bias.fill_(0.0)
    loss = obj(logits, torch.tensor([0]), torch.tensor([True]))
    loss.backward()
    expected = math.log1p(math.exp(10.0)) + math.log1p(math.exp(0.0)) + math.log1p(math.exp(3.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logits.grad[0, 0].item() == 0.0
    assert logits.grad[0, 1].item() == pytest.approx(0.5)
    assert logits.grad[0, 2].item() == pytest.approx(1 / (1 + math.exp(-3.0)), rel=1e-6)
    assert obj.bias.grad.item() == pytest.approx(-(0.5 + 1 / (1 + math.exp(-3.0))), rel=1e-6)


@pytest.mark.parametrize("name", sorted(MARGINS))
def test_bias_is_initialised_to_log_ten_c_r(name) -> None:
    params = MARGINS[name][0]
    assert MarginHead(8, 1000, margin=name, objective="uniface", **params).objective.bias.item() == pytest.approx(
        math.log(10 * 1000), rel=1e-7
    )
    head = PartialFCHead(8, 40, margin=name, objective="uniface", sample_rate=0.25, seed=0, **params)
    assert head.objective.bias.item() == pytest.approx(math.log(10 * 40 * 0.25), rel=1e-7)
    # ExpFace authors' setting: r = 1 with all 93 431 MS1MV3 classes -> b = log(934 310) ~ 13.75
    assert UniFace(93_431).bias.item() == pytest.approx(math.log(934_310), rel=1e-7)


def test_unlabelled_batch_and_float32_in_place_backward() -> None:
    head = MarginHead(D, C, margin="cosface", objective="uniface")
    x = torch.randn(4, D, requires_grad=True)
    loss = head.loss(x, torch.full((4,), -1))
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any() and head.objective.bias.grad.item() == 0.0
    x64, w, labels = batch(1)
    head64 = MarginHead(D, C, margin="cosface", objective="uniface").double()
    head32 = MarginHead(D, C, margin="cosface", objective="uniface")
    with torch.no_grad():
        head64.weight.copy_(w)
        head32.weight.copy_(w.float())
    head64.loss(x64, labels).backward()
    head32.loss(x64.float(), labels).backward()
    torch.testing.assert_close(head32.weight.grad.double(), head64.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head32.objective.bias.grad.double(), head64.objective.bias.grad, rtol=1e-4, atol=1e-6)


def test_objective_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown objective 'focal'.*softmax, uniface"):
        MarginHead(4, 3, objective="focal")
    with pytest.raises(ValueError, match="'softmax' takes no parameters"):
        MarginHead(4, 3, objective_params={"lam": 0.5})
    with pytest.raises(ValueError, match="objective 'uniface'.*lambda"):
        MarginHead(4, 3, objective="uniface", objective_params={"lambda": 0.5})
    with pytest.raises(ValueError, match="ready UniFace"):
        build_objective(UniFace(3), 3, 1.0, 64.0, {"lam": 0.5})
    ready = UniFace(3, lam=0.5)
    assert MarginHead(4, 3, objective=ready).objective is ready
