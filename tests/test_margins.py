"""psi-margins and the dynamic margins against values computed by hand (plain ``math`` / float64
torch written from the papers and the ExpFace authors' ``losses.py``, not from the library)."""

from __future__ import annotations

import math

import pytest
import torch

from facemargin.margins import (
    MARGINS,
    Margin,
    MarginInput,
    available_margins,
    build_margin,
    target_logit,
)

PSI = list(MARGINS)

THETAS = [0.0, math.pi / 6, math.pi / 3, math.pi / 2, 2 * math.pi / 3, math.pi - 1e-4]


def psi_by_hand(name: str, t: float) -> float:
    """The papers' formulas, written out once more with scalars."""
    if name == "softmax":
        return math.cos(t)
    if name == "sphereface":
        k = math.floor(1.5 * t / math.pi)
        return (-1) ** k * math.cos(1.5 * t) - 2 * k
    if name == "cosface":
        return math.cos(t) - 0.35
    if name == "arcface":
        return math.cos(t + 0.5)
    if name == "combined":  # the test uses m1=0.9, m2=0.3, m3=0.2
        return math.cos(0.9 * t + 0.3) - 0.2
    if name == "expface":
        return math.cos(math.pi * (t / math.pi) ** 0.7)
    raise AssertionError(name)


PARAMS = {"combined": {"m1": 0.9, "m2": 0.3, "m3": 0.2}}


def test_registry_lists_every_loss():
    assert available_margins() == [
        "softmax", "sphereface", "cosface", "arcface", "combined", "expface",
        "curricularface", "adaface", "magface", "sphereface_r",
    ]
    assert PSI == available_margins()[:6]
    assert type(build_margin("adaface", m=0.3)).__name__ == "AdaFace"


def test_paper_defaults():
    assert (Margin("expface").s, Margin("expface").params) == (64.0, {"m": 0.7})
    assert (Margin("cosface").s, Margin("cosface").params) == (64.0, {"m": 0.35})
    assert Margin("arcface").params == {"m": 0.5, "fallback": False}
    assert (Margin("sphereface").s, Margin("sphereface").params) == (30.0, {"m": 1.5})
    assert Margin("combined").params == {"m1": 1.0, "m2": 0.5, "m3": 0.0}


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match="valid margins: softmax, sphereface, cosface, arcface, combined, expface, curricularface"):
        build_margin("arcfase")
    with pytest.raises(ValueError, match="valid: m"):
        Margin("expface", q=1.0)
    with pytest.raises(ValueError, match="detached, exact"):
        Margin("expface", grad="approx")


def test_literal_values_worked_on_paper():
    # theta = pi/2: ExpFace cos(pi * 0.5**0.7) = cos(1.933877...) = -0.355156...
    cos = torch.tensor([0.0])
    assert target_logit("expface", cos).item() == pytest.approx(-0.355156, abs=1e-5)
    # theta = pi/3: ArcFace cos(pi/3 + 0.5) = 0.023592...; CosFace 0.5 - 0.35
    cos = torch.tensor([0.5])
    assert target_logit("arcface", cos).item() == pytest.approx(0.0235929, abs=1e-5)
    assert target_logit("cosface", cos).item() == pytest.approx(0.15, abs=1e-6)
    # theta = 2pi/3: SphereFace m*theta = pi -> k = 1 branch: -cos(pi) - 2 = -1
    assert target_logit("sphereface", torch.tensor([-0.5])).item() == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize("name", PSI)
@pytest.mark.parametrize("grad", ["detached", "exact"])
def test_values_at_the_six_angles(name, grad):
    cos = torch.tensor([math.cos(t) for t in THETAS], dtype=torch.float32)
    got = target_logit(name, cos, grad=grad, **PARAMS.get(name, {}))
    # what the float32 input really encodes (cos(pi - 1e-4) rounds to -1.0 in float32)
    want = [psi_by_hand(name, math.acos(max(-1.0, min(1.0, float(c))))) for c in cos]
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(want, abs=2e-5)


EPS32 = math.sqrt(2.0**-23)  # the smallest angle a float32 cosine tells from 0 (and from pi)
EPS64 = math.sqrt(2.0**-52)  # float64's


def dpsi_dcos_by_hand(name: str, c: float) -> float:
    """Central difference of psi(theta) in float64, at theta clamped as the exact mode promises
    for a float32 cosine (only cos = +-1 exactly is moved, to the smallest angle float32 resolves)."""
    t = min(max(math.acos(max(-1.0, min(1.0, c))), EPS32), math.pi - EPS32)
    h = 1e-6
    dpsi_dt = (psi_by_hand(name, t + h) - psi_by_hand(name, t - h)) / (2 * h)
    return dpsi_dt * (-1.0 / math.sin(t))


@pytest.mark.parametrize("name", PSI)
def test_gradients_both_modes(name):
    cos = torch.tensor([math.cos(t) for t in THETAS], dtype=torch.float32, requires_grad=True)
    target_logit(name, cos, grad="detached", **PARAMS.get(name, {})).sum().backward()
    assert cos.grad.tolist() == [1.0] * len(THETAS)  # reference behaviour: d logit / d cos = 1

    cos.grad = None
    target_logit(name, cos, grad="exact", **PARAMS.get(name, {})).sum().backward()
    want = [dpsi_dcos_by_hand(name, float(c)) for c in cos.detach()]
    assert torch.isfinite(cos.grad).all()
    assert cos.grad.tolist() == pytest.approx(want, rel=2e-3, abs=2e-3)


def test_exact_gradients_known_closed_forms():
    # CosFace: d(cos - m)/dcos = 1. ArcFace at theta=pi/2: d cos(theta+m)/dcos = sin(theta+m)/sin(theta) = cos(m).
    cos = torch.tensor([0.0], requires_grad=True)
    target_logit("cosface", cos, grad="exact").backward()
    assert cos.grad.item() == pytest.approx(1.0)
    cos.grad = None
    target_logit("arcface", cos, grad="exact").backward()
    assert cos.grad.item() == pytest.approx(math.cos(0.5), abs=1e-5)
    # ExpFace at theta=pi/2: sin(pi x^m) * m x^(m-1) / sin(theta), x = 1/2
    cos.grad = None
    target_logit("expface", cos, grad="exact").backward()
    x = 0.5
    assert cos.grad.item() == pytest.approx(math.sin(math.pi * x**0.7) * 0.7 * x ** (0.7 - 1), abs=1e-5)


@pytest.mark.parametrize("name", PSI)
@pytest.mark.parametrize("grad", ["detached", "exact"])
def test_no_nan_or_inf_at_plus_minus_one(name, grad):
    cos = torch.tensor([1.0, -1.0, 1.0 - 1e-7, -1.0 + 1e-7, 1.0000001, -1.0000001], requires_grad=True)
    out = target_logit(name, cos, grad=grad)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


@pytest.mark.parametrize("name", PSI)
@pytest.mark.parametrize("grad", ["detached", "exact"])
def test_bf16_autocast_computes_in_float32(name, grad):
    cos32 = torch.linspace(-1, 1, 101)
    want = target_logit(name, cos32, grad=grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = target_logit(name, cos32.bfloat16(), grad=grad)
    assert got.dtype == torch.float32
    # the only difference allowed is the bf16 rounding of the input cosines
    expected = target_logit(name, cos32.bfloat16().float(), grad=grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - want).abs().max() < 0.05


@pytest.mark.parametrize("name", ["expface", "cosface"])
def test_strictly_decreasing_in_theta(name):
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    psi = target_logit(name, torch.cos(theta).float()).double()
    assert (psi[1:] < psi[:-1]).all()


def test_sphereface_continuous_and_monotone():
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    psi = target_logit("sphereface", torch.cos(theta)).double()
    steps = psi[1:] - psi[:-1]
    assert (steps <= 1e-6).all()  # non-increasing
    assert steps.abs().max() < 1e-3  # no jump where k changes (m*theta = pi)


def test_arcface_fallback_is_monotone_and_matches_paper():
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    plain = target_logit("arcface", torch.cos(theta)).double()
    assert (plain[1:] > plain[:-1]).any()  # cos(theta + m) turns back up past pi - m
    fb = target_logit("arcface", torch.cos(theta), fallback=True).double()
    # past pi - m: cos(theta) - m sin(m)
    t = 2.9
    assert target_logit("arcface", torch.tensor([math.cos(t)]), fallback=True).item() == pytest.approx(
        math.cos(t) - 0.5 * math.sin(0.5), abs=1e-5
    )
    assert (fb[1:] < fb[:-1] + 1e-6).all()


def test_logits_margin_on_target_only_and_minus_one_rows_untouched():
    torch.manual_seed(0)
    cos = torch.rand(4, 6) * 2 - 1
    labels = torch.tensor([2, -1, 0, 5])
    m = Margin("cosface", s=10.0)
    out = m.logits(cos, labels)
    want = cos.clone()
    for i, y in enumerate(labels.tolist()):
        if y >= 0:
            want[i, y] -= 0.35
    torch.testing.assert_close(out, want * 10.0)
    torch.testing.assert_close(out[1], cos[1] * 10.0)


# ----------------------------------------------------------------------------- float64, ranges, labels
@pytest.mark.parametrize("name", PSI)
def test_float64_in_float64_out_and_gradcheck_exact(name):
    params = PARAMS.get(name, {})
    # interior angles, away from SphereFace's branch point (120 deg) and ArcFace's pi - m
    cos = torch.tensor([0.93, 0.41, -0.05, -0.37, -0.6], dtype=torch.float64, requires_grad=True)
    assert target_logit(name, cos, **params).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda c: target_logit(name, c, grad="exact", **params), (cos,))
    block = torch.tensor([[0.3, -0.2, 0.7], [0.1, 0.5, -0.9]], dtype=torch.float64, requires_grad=True)
    margin = Margin(name, grad="exact", **params)
    assert margin.logits(block, torch.tensor([2, -1])).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda c: margin.logits(c, torch.tensor([2, 0])), (block,))


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("expface", {"m": 0.0}, r"'expface': m must lie in \(0, 1\]; got 0.0"),
        ("expface", {"m": 1.5}, r"'expface': m must lie in \(0, 1\]"),
        ("expface", {"s": 0.0}, r"s must lie in \(0, inf\]"),
        ("expface", {"s": -64.0}, r"s must lie in \(0"),
        ("cosface", {"m": -0.1}, r"'cosface': m must lie in \[0, 1\]"),
        ("arcface", {"m": 3.5}, r"'arcface': m must lie in \[0, 3.14159\)"),
        ("sphereface", {"m": 0.5}, r"'sphereface': m must lie in \[1, inf\)"),
        ("combined", {"m1": 0.0}, r"'combined': m1 must lie in \(0, inf\)"),
        ("expface", {"m": float("nan")}, r"m must lie in"),
    ],
)
def test_parameters_are_range_checked(name, params, message):
    with pytest.raises(ValueError, match=message):
        Margin(name, **params)


def test_dynamic_only_where_defined():
    with pytest.raises(ValueError, match="dynamic='balanced' is defined for expface, cosface, arcface, sphereface"):
        Margin("softmax", dynamic="balanced")
    with pytest.raises(ValueError, match="unknown dynamic mode 'sometimes'"):
        Margin("expface", dynamic="sometimes")
    with pytest.raises(ValueError, match="m depends on the batch"):
        Margin("expface", dynamic="plain").target_logit(torch.zeros(3))


def test_margin_logits_reject_bad_labels():
    m, cos = Margin("cosface"), torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) or be -1; got range \[-2, 1\]"):
        m.logits(cos, torch.tensor([0, -2, 1]))
    with pytest.raises(TypeError, match="integer tensor; got torch.bool"):
        m.logits(cos, torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match="integer tensor; got torch.float32"):
        m.logits(cos, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        m.logits(cos, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- dynamic margins
def psi_with(name: str, t: float, m: float) -> float:
    """psi(theta) with margin m (the papers' formulas, scalars)."""
    if name == "expface":
        return math.cos(math.pi * (t / math.pi) ** m)
    if name == "cosface":
        return math.cos(t) - m
    if name == "arcface":
        return math.cos(t + m)
    k = math.floor(m * t / math.pi)  # sphereface
    return (-1) ** k * math.cos(m * t) - 2 * k


def dpsi_dtheta_with(name: str, t: float, m: float) -> float:
    """d psi / d theta of :func:`psi_with`, differentiated by hand."""
    if name == "expface":
        x = t / math.pi
        return -math.sin(math.pi * x**m) * m * x ** (m - 1)
    if name == "cosface":
        return -math.sin(t)
    if name == "arcface":
        return -math.sin(t + m)
    k = math.floor(m * t / math.pi)  # sphereface
    return -((-1) ** k) * m * math.sin(m * t)


def dynamic_m_by_hand(name: str, cos: list[list[float]], labels: list[int], s: float, balanced: bool) -> float:
    """The ExpFace authors' PowerFace_d / CosFace_d / ArcFace_d / SphereFace_d margin (``*_dd``
    without the ln(C-1)/s term), over the labelled rows, with plain Python floats."""
    c = len(cos[0])
    pos = [row[y] for row, y in zip(cos, labels) if y >= 0]
    neg = [v for row, y in zip(cos, labels) if y >= 0 for j, v in enumerate(row) if j != y]
    p, n = sum(pos) / len(pos), sum(neg) / len(neg)
    b = math.log(c - 1) / s if balanced else 0.0
    if name == "cosface":
        return p - n - b
    theta_p, phi = math.acos(p), math.acos(n + b)
    if name == "expface":
        return math.log(phi / math.pi) / math.log(theta_p / math.pi)
    if name == "arcface":
        return phi - theta_p
    return phi / theta_p


DYN_COS = [
    [1.0, 0.2, -0.3, 0.05, -1.0],  # target (col 0) at cos = +1, a non-target at -1
    [0.1, -0.4, 0.6, 0.3, 0.0],
    [-1.0, 0.25, 0.1, -0.2, 0.4],  # target (col 0) at cos = -1
    [0.3, 0.3, 0.3, 0.3, 0.3],  # label -1: ignored by the means
    [0.2, -0.1, 0.45, 0.0, 0.75],
]
DYN_LABELS = [0, 2, 0, -1, 4]


@pytest.mark.parametrize("name", ["expface", "cosface", "arcface", "sphereface"])
@pytest.mark.parametrize("mode", ["balanced", "plain"])
@pytest.mark.parametrize("grad", ["detached", "exact"])
def test_dynamic_margin_values_gradients_and_log(name, mode, grad):
    s = 16.0
    cos = torch.tensor(DYN_COS, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(DYN_LABELS)
    margin = Margin(name, s=s, dynamic=mode, grad=grad)
    out = margin(MarginInput.single(cos, labels))
    m = dynamic_m_by_hand(name, DYN_COS, DYN_LABELS, s, mode == "balanced")
    assert out.logs["m"].item() == pytest.approx(m, rel=1e-12)
    want = [[s * v for v in row] for row in DYN_COS]
    for i, y in enumerate(DYN_LABELS):
        if y >= 0:
            want[i][y] = s * psi_with(name, math.acos(DYN_COS[i][y]), m)
    torch.testing.assert_close(out.logits, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)
    weights = torch.linspace(-1, 1, cos.numel(), dtype=torch.float64).view_as(cos)
    (out.logits * weights).sum().backward()
    grad_want = weights * s  # m has no gradient; non-targets and detached targets: d/dcos = s
    if grad == "exact":
        for i, y in enumerate(DYN_LABELS):
            if y >= 0:
                t = min(max(math.acos(DYN_COS[i][y]), EPS64), math.pi - EPS64)
                dpsi = dpsi_dtheta_with(name, t, m) * (-1.0 / math.sin(t))
                grad_want[i, y] = weights[i, y] * s * dpsi
    torch.testing.assert_close(cos.grad, grad_want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(cos.grad).all()


def test_dynamic_margin_without_labelled_rows_is_plain_scaled_cosine():
    cos = torch.tensor(DYN_COS)
    out = Margin("expface", dynamic="balanced")(MarginInput.single(cos, torch.full((5,), -1)))
    assert "m" not in out.logs
    torch.testing.assert_close(out.logits, cos * 64.0)


def test_dynamic_m_uses_the_global_number_of_classes():
    cos = torch.tensor(DYN_COS, dtype=torch.float64)
    inp = MarginInput(cos, torch.tensor(DYN_LABELS), torch.tensor(DYN_LABELS) >= 0, num_classes=1000)
    m = Margin("cosface", s=16.0, dynamic="balanced")(inp).logs["m"].item()
    by_hand = dynamic_m_by_hand("cosface", DYN_COS, DYN_LABELS, 16.0, False) - math.log(999) / 16.0
    assert m == pytest.approx(by_hand, rel=1e-12)
