"""CurricularFace, AdaFace, MagFace and SphereFace-R against references written here from the
authors' code (HuangYG123/CurricularFace ``head/metrics.py``, mk-minchul/AdaFace ``head.py``,
IrvingMeng/MagFace ``models/magface.py`` + ``run/trainer.py``, the ExpFace authors' ``SphereFaceRv2``),
in float64 with plain torch ops and autograd -- not by calling the library.

The inputs hold cosines of exactly +1 and -1 (targets and non-targets) and a row labelled -1
(extension: no target, no hard negatives, left out of every batch statistic). At cos = +-1 the
references' gradient is 0 (``cos.clamp(-1, 1)``, whose backward is 0 at the bounds) or inf/NaN
(``sqrt(1 - cos^2)``): there the library's documented finite values are checked instead (the
formula's derivative at the smallest angle float64 resolves, ``sin(theta) = sin(sqrt(eps))``).
"""

from __future__ import annotations

import math

import pytest
import torch

from facemargin.heads import MarginHead
from facemargin.margins import AdaFace, CurricularFace, MagFace, MarginInput, SphereFaceR

SIN_MIN = math.sin(math.sqrt(2.0**-52))  # float64: sin of the smallest angle it tells from 0

F64 = torch.float64
COS = [
    [1.0, 0.2, -0.3, 0.05, -1.0],  # target 0 at +1; a non-target at -1
    [0.1, -0.4, 0.62, 0.3, 0.0],  # target 2
    [-1.0, 0.25, 0.1, -0.2, 1.0],  # target 0 at -1; a non-target at +1 (a hard negative)
    [0.3, 0.35, 0.9, 0.3, -0.5],  # label -1
    [0.2, -0.1, 0.45, 0.0, 0.75],  # target 4; col 2 is a hard negative at m = 0.5
    [-0.3, 0.8, 0.1, 0.4, -0.6],  # target 3; col 1 hard
]
LABELS = [0, 2, 0, -1, 4, 3]
NORMS = [25.0, 8.0, 60.0, 33.0, 120.0, 14.5]  # below l_a, above u_a, inside
WEIGHTS = torch.linspace(-1.3, 1.1, 30, dtype=F64).view(6, 5)  # a random-ish linear functional


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cos = torch.tensor(COS, dtype=F64, requires_grad=True)
    norms = torch.tensor(NORMS, dtype=F64, requires_grad=True)
    return cos, torch.tensor(LABELS), norms


def at_unit(cos: torch.Tensor) -> torch.Tensor:
    """Entries of exactly cos = +-1."""
    return cos.detach().abs() == 1.0


# ----------------------------------------------------------------------------- CurricularFace
def curricular_ref(cos, labels, t_prev, m=0.5, s=64.0):
    """head/metrics.py CurricularFace.forward, labelled rows only."""
    c = cos.clamp(-1, 1)
    rows = torch.nonzero(labels >= 0).flatten()
    target = c[rows, labels[rows]]
    sin_theta = torch.sqrt(1.0 - target**2)
    cos_theta_m = target * math.cos(m) - sin_theta * math.sin(m)
    final = torch.where(target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m)
    with torch.no_grad():
        t = target.mean() * 0.01 + 0.99 * t_prev
    out = c.clone()
    for k, i in enumerate(rows.tolist()):
        hard = c[i] > cos_theta_m[k].detach()
        out[i] = torch.where(hard, c[i] * (t + c[i]), c[i])
    out = out.index_put((rows, labels[rows]), final)
    return out * s, float(t)


def test_curricularface_values_gradients_and_t_over_two_steps():
    margin = CurricularFace()
    t_prev = 0.0
    for step in range(2):
        cos, labels, _ = inputs()
        cos_ref = cos.detach().clone().requires_grad_()
        if step == 1:  # a different batch: shift the cosines a little
            with torch.no_grad():
                cos.mul_(0.9)
                cos_ref.mul_(0.9)
        out = margin(MarginInput.single(cos, labels))
        want, t_prev = curricular_ref(cos_ref, labels, t_prev)
        assert margin.t.item() == pytest.approx(t_prev, rel=1e-6)  # updated before use
        assert out.logs["t"].item() == pytest.approx(t_prev, rel=1e-6)
        torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-5)
        (out.logits * WEIGHTS).sum().backward()
        (want * WEIGHTS).sum().backward()
        unit = at_unit(cos)
        assert unit.sum() == (0 if step == 1 else 4)
        torch.testing.assert_close(cos.grad[~unit], cos_ref.grad[~unit], rtol=1e-6, atol=1e-6)
        if step == 0:
            # target +1: cos m + sin m / SIN_MIN; target -1: fallback cos - m sin m, slope 1;
            # non-target -1 (row 0, threshold cos(0.5)): plain; non-target +1 (row 2, threshold
            # cos(pi + 0.5)): hard, slope t + 2c
            slope = torch.ones(6, 5, dtype=F64)
            slope[0, 0] = math.cos(0.5) + math.sin(0.5) / SIN_MIN
            slope[2, 4] = t_prev + 2.0
            torch.testing.assert_close(cos.grad[unit], (64 * WEIGHTS * slope)[unit], rtol=1e-6, atol=0)


def test_curricularface_eval_does_not_update_t_and_gradcheck():
    margin = CurricularFace(m=0.4, s=8.0)
    margin.t.fill_(0.3)
    margin.eval()
    cos = torch.tensor([[0.6, 0.1, 0.5], [0.05, -0.2, 0.3]], dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 2])
    assert torch.autograd.gradcheck(lambda c: margin.logits(c, labels), (cos,))
    assert margin.t.item() == pytest.approx(0.3)


# ----------------------------------------------------------------------------- AdaFace
def adaface_ref(cos, norms, labels, mean_prev, std_prev, m=0.4, h=0.333, s=64.0, t_alpha=0.01):
    """head.py AdaFace.forward; batch statistics over the labelled rows."""
    eps = 1e-3
    cosine = cos.clamp(-1 + eps, 1 - eps)
    safe = torch.clip(norms, min=0.001, max=100).clone().detach()
    lab = labels >= 0
    with torch.no_grad():
        mean = mean_prev if lab.sum() == 0 else safe[lab].mean() * t_alpha + (1 - t_alpha) * mean_prev
        std = std_prev if lab.sum() < 2 else safe[lab].std() * t_alpha + (1 - t_alpha) * std_prev
    scaler = torch.clip((safe - mean) / (std + eps) * h, -1, 1)
    onehot = torch.zeros_like(cosine)
    rows = torch.nonzero(lab).flatten()
    onehot[rows, labels[rows]] = 1.0
    theta = cosine.acos()
    theta_m = torch.clip(theta + onehot * (-m * scaler).unsqueeze(1), min=eps, max=math.pi - eps)
    out = theta_m.cos() - onehot * (m + m * scaler).unsqueeze(1)
    return out * s, float(mean), float(std)


def test_adaface_values_gradients_and_statistics_over_two_steps():
    margin = AdaFace()
    mean, std = 20.0, 100.0
    for step in range(2):
        cos, labels, norms = inputs()
        if step == 1:
            norms = (norms.detach() * 1.5).requires_grad_()
        cos_ref = cos.detach().clone().requires_grad_()
        out = margin(MarginInput.single(cos, labels, norms))
        want, mean, std = adaface_ref(cos_ref, norms.detach(), labels, mean, std)
        assert (margin.batch_mean.item(), margin.batch_std.item()) == pytest.approx((mean, std), rel=1e-6)
        torch.testing.assert_close(out.logits, want, rtol=0, atol=2e-4)  # float32 buffers
        (out.logits * WEIGHTS).sum().backward()
        (want * WEIGHTS).sum().backward()
        torch.testing.assert_close(cos.grad, cos_ref.grad, rtol=1e-6, atol=1e-6)
        assert norms.grad is None or not norms.grad.any()  # norms are detached


def test_adaface_single_labelled_row_keeps_std_and_gradcheck():
    margin = AdaFace(m=0.3, s=10.0)
    cos = torch.tensor([[0.6, 0.1, 0.5], [0.05, -0.2, 0.3]], dtype=F64, requires_grad=True)
    norms = torch.tensor([30.0, 12.0], dtype=F64)
    margin(MarginInput.single(cos, torch.tensor([0, -1]), norms))
    assert margin.batch_mean.item() == pytest.approx(0.99 * 20 + 0.01 * 30)
    assert margin.batch_std.item() == 100.0  # one labelled row: no std, the EMA is left as is
    margin.eval()
    assert torch.autograd.gradcheck(lambda c: margin.logits(c, torch.tensor([0, 2]), norms), (cos,))


# ----------------------------------------------------------------------------- MagFace
def magface_ref(cos, norms, labels, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, s=64.0):
    """models/magface.py MagLinear (easy_margin=True) + MagLoss, at the target column."""
    x_norm = norms.clamp(l_a, u_a)
    ada = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    c = cos.clamp(-1, 1)
    rows = torch.nonzero(labels >= 0).flatten()
    target = c[rows, labels[rows]]
    sin_theta = torch.sqrt(1.0 - target**2)
    ctm = target * torch.cos(ada[rows]) - sin_theta * torch.sin(ada[rows])
    ctm = torch.where(target > 0, ctm, target)
    out = c.index_put((rows, labels[rows]), ctm) * s
    g = (1 / u_a**2 * x_norm[rows] + 1 / x_norm[rows]).mean()
    return out, lambda_g * g


def test_magface_values_gradients_and_regulariser():
    margin = MagFace()
    cos, labels, norms = inputs()
    cos_ref, norms_ref = cos.detach().clone().requires_grad_(), norms.detach().clone().requires_grad_()
    out = margin(MarginInput.single(cos, labels, norms))
    want, g = magface_ref(cos_ref, norms_ref, labels)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-9)
    assert out.extra_losses["magface_g"].item() == pytest.approx(g.item(), rel=1e-12)
    ((out.logits * WEIGHTS).sum() + 3 * out.extra_losses["magface_g"]).backward()
    ((want * WEIGHTS).sum() + 3 * g).backward()
    torch.testing.assert_close(norms.grad, norms_ref.grad, rtol=1e-9, atol=1e-12)
    assert norms.grad[1] == 0 and norms.grad[4] == 0  # outside [l_a, u_a]: clamped, no gradient
    unit = at_unit(cos)
    torch.testing.assert_close(cos.grad[~unit], cos_ref.grad[~unit], rtol=1e-9, atol=1e-9)
    # at +-1: target +1 takes the margin (slope cos m + sin m / SIN_MIN), target -1 and
    # the non-targets take cos itself (slope 1)
    m0 = 0.35 / 100 * (25 - 10) + 0.45
    slope = torch.ones(6, 5, dtype=F64)
    slope[0, 0] = math.cos(m0) + math.sin(m0) / SIN_MIN
    torch.testing.assert_close(cos.grad[unit], (64 * WEIGHTS * slope)[unit], rtol=1e-9, atol=0)


def test_magface_gradcheck_in_cos_and_norms():
    margin = MagFace(s=8.0, lambda_g=2.0, easy_margin=False)
    cos = torch.tensor([[0.6, 0.1, 0.5], [-0.95, -0.2, 0.3]], dtype=F64, requires_grad=True)
    norms = torch.tensor([30.0, 52.0], dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 0])

    def f(c, a):
        out = margin(MarginInput.single(c, labels, a))
        return out.logits.sum() * 0.1 + out.extra_losses["magface_g"]

    assert torch.autograd.gradcheck(f, (cos, norms))


# ----------------------------------------------------------------------------- SphereFace-R
def spherefacer_ref(cos, labels, m=1.4, s=60.0):
    """The ExpFace authors' SphereFaceRv2.forward (non-targets cos(theta / m), without autograd)."""
    x = cos.clone()
    rows = torch.nonzero(labels >= 0).flatten()
    with torch.no_grad():
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[rows, labels[rows]] = False
        x[mask] = (x[mask].arccos() / m).cos()
    return x * s


def test_spherefacer_values_and_detached_gradient():
    margin = SphereFaceR()
    cos, labels, _ = inputs()
    cos_ref = cos.detach().clone().requires_grad_()
    out = margin(MarginInput.single(cos, labels))
    want = spherefacer_ref(cos_ref, labels)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-12)
    assert out.logits[2, 4].item() == pytest.approx(60.0) and out.logits[0, 4].item() == pytest.approx(60 * math.cos(math.pi / 1.4))
    (out.logits * WEIGHTS).sum().backward()
    (want * WEIGHTS).sum().backward()
    torch.testing.assert_close(cos.grad, cos_ref.grad)
    torch.testing.assert_close(cos.grad, WEIGHTS * 60.0)


# ----------------------------------------------------------------------------- contract details
@pytest.mark.parametrize(
    ("cls", "params", "message"),
    [
        (CurricularFace, {"m": -0.1}, r"curricularface: m must lie in \[0, 3.14159\)"),
        (CurricularFace, {"s": 0}, r"CurricularFace: s must lie in \(0"),
        (AdaFace, {"h": 0.0}, r"adaface: h must lie in \(0, inf\]"),
        (AdaFace, {"t_alpha": 1.5}, r"adaface: t_alpha must lie in \(0, 1\]"),
        (MagFace, {"l_a": 50.0, "u_a": 20.0}, r"magface: u_a must lie in \(50, inf\]"),
        (MagFace, {"l_m": 0.9, "u_m": 0.5}, r"magface: u_m must lie in \[0.9, 1.5708\]"),
        (SphereFaceR, {"m": 0.9}, r"sphereface_r: m must lie in \[1, inf\]"),
    ],
)
def test_parameters_are_range_checked(cls, params, message):
    with pytest.raises(ValueError, match=message):
        cls(**params)


def test_norm_margins_need_norms():
    with pytest.raises(ValueError, match="needs the \\[B\\] embedding norms"):
        AdaFace().logits(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="magface needs MarginInput.norms"):
        MagFace()(MarginInput.single(torch.zeros(2, 3), torch.tensor([0, 1])))


def test_magface_regulariser_is_an_extra_loss_logged_apart():
    torch.manual_seed(0)
    head = MarginHead(8, 5, margin="magface")
    x = torch.randn(4, 8) * 5
    out = head.output(x, torch.tensor([0, 1, -1, 4]))
    assert set(out.logs) == {"ce", "magface_g"}
    assert out.loss.item() == pytest.approx(out.logs["ce"].item() + out.logs["magface_g"].item(), rel=1e-6)
    a = x.norm(dim=1).clamp(10, 110)[[0, 1, 3]]
    assert out.logs["magface_g"].item() == pytest.approx(35 * float((a / 110**2 + 1 / a).mean()), rel=1e-5)
