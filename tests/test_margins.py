"""Margin functions against values computed by hand (plain ``math``, independent of torch)."""

from __future__ import annotations

import math

import pytest
import torch

from facemargin.margins import THETA_EPS, Margin, available_margins, build_margin, target_logit

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
    assert available_margins() == ["softmax", "sphereface", "cosface", "arcface", "combined", "expface"]


def test_paper_defaults():
    assert (Margin("expface").s, Margin("expface").params) == (64.0, {"m": 0.7})
    assert (Margin("cosface").s, Margin("cosface").params) == (64.0, {"m": 0.35})
    assert Margin("arcface").params == {"m": 0.5, "fallback": False}
    assert (Margin("sphereface").s, Margin("sphereface").params) == (30.0, {"m": 1.5})
    assert Margin("combined").params == {"m1": 1.0, "m2": 0.5, "m3": 0.0}


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match="valid margins: softmax, sphereface, cosface, arcface, combined, expface"):
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


@pytest.mark.parametrize("name", available_margins())
@pytest.mark.parametrize("grad", ["detached", "exact"])
def test_values_at_the_six_angles(name, grad):
    cos = torch.tensor([math.cos(t) for t in THETAS], dtype=torch.float32)
    got = target_logit(name, cos, grad=grad, **PARAMS.get(name, {}))
    # what the float32 input really encodes (cos(pi - 1e-4) rounds to -1.0 in float32)
    want = [psi_by_hand(name, math.acos(max(-1.0, min(1.0, float(c))))) for c in cos]
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(want, abs=2e-5)


def dpsi_dcos_by_hand(name: str, c: float) -> float:
    """Central difference of psi(theta) in float64, at theta clamped as the exact mode promises."""
    t = min(max(math.acos(max(-1.0, min(1.0, c))), THETA_EPS), math.pi - THETA_EPS)
    h = 1e-6
    dpsi_dt = (psi_by_hand(name, t + h) - psi_by_hand(name, t - h)) / (2 * h)
    return dpsi_dt * (-1.0 / math.sin(t))


@pytest.mark.parametrize("name", available_margins())
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


@pytest.mark.parametrize("name", available_margins())
@pytest.mark.parametrize("grad", ["detached", "exact"])
def test_no_nan_or_inf_at_plus_minus_one(name, grad):
    cos = torch.tensor([1.0, -1.0, 1.0 - 1e-7, -1.0 + 1e-7, 1.0000001, -1.0000001], requires_grad=True)
    out = target_logit(name, cos, grad=grad)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


@pytest.mark.parametrize("name", available_margins())
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
