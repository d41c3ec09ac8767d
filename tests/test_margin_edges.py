"""The margins' last edges: exact gradients at target angles below 1e-3 rad, the running
statistics' dtype, parameter validation, the dynamic margins where the authors' ``m`` is (not)
finite, SphereFace's ``s`` and Sub-center ArcFace's gradient.

References are written here from the formulas and the authors' code, not from the library:
derivatives in 50-digit ``mpmath`` at the angle the input cosine really encodes
(``acos`` of its exact binary value), the ExpFace authors' ``*_d`` margins with Python floats,
insightface's MXNet Sub-center ArcFace symbol (``recognition/subcenter_arcface/train_parall.py``:
``reshape (-1, C, K)``, ``max``, ``arccos``, ``+ m``, ``cos``, one-hot difference) in float64 torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facemargin.heads import MarginHead, PartialFCHead
from facemargin.margins import (
    THETA_EPS,
    AdaFace,
    CurricularFace,
    MagFace,
    Margin,
    MarginInput,
    SphereFaceR,
    build_margin,
    target_logit,
)

mpmath.mp.dps = 50
ANGLES = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
README = Path(__file__).resolve().parents[1] / "README.md"


# ----------------------------------------------------------------------------- references
def encoded_theta(c: float) -> mpmath.mpf:
    """The angle a (float32 or float64) cosine really encodes, to 50 digits."""
    return mpmath.acos(mpmath.mpf(c))


def dpsi_dcos_ref(name: str, c: float, m: float = 0.5) -> float:
    """d psi(acos c) / d c = psi'(theta) * (-1 / sin theta), from each paper's formula."""
    t = encoded_theta(c)
    if name == "arcface":  # cos(theta + m)
        dpsi = -mpmath.sin(t + m)
    elif name == "expface":  # cos(pi (theta/pi)^m)
        x = t / mpmath.pi
        dpsi = -mpmath.sin(mpmath.pi * x**m) * m * x ** (m - 1)
    elif name == "sphereface":  # cos(m theta) for m theta < pi
        dpsi = -m * mpmath.sin(m * t)
    elif name == "combined":  # cos(m1 theta + m2) - m3, m1 = 1, m2 = m
        dpsi = -mpmath.sin(t + m)
    else:
        raise AssertionError(name)
    return float(dpsi * (-1 / mpmath.sin(t)))


def cosines(angles: list[float], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([math.cos(a) for a in angles], dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- small angles
@pytest.mark.parametrize(("name", "m"), [("arcface", 0.5), ("expface", 0.7), ("sphereface", 1.5), ("combined", 0.5)])
def test_psi_exact_gradient_below_1e3_rad_float64(name, m):
    cos = cosines(ANGLES, torch.float64).requires_grad_()
    target_logit(name, cos, grad="exact").sum().backward()
    want = [dpsi_dcos_ref(name, float(c), m) for c in cos.detach()]
    # ArcFace at 1e-4 rad: 4795.13 (the old bound sin(theta) >= sin(1e-3) gave 480.30, 10x too small)
    assert cos.grad.tolist() == pytest.approx(want, rel=1e-8)


def test_psi_exact_gradient_float32_down_to_the_smallest_angle_it_resolves():
    below_one = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # theta = 3.45e-4 rad
    cos = torch.tensor([math.cos(1e-2), math.cos(1e-3), below_one], dtype=torch.float32, requires_grad=True)
    target_logit("arcface", cos, grad="exact").sum().backward()
    want = [dpsi_dcos_ref("arcface", float(c)) for c in cos.detach()]
    assert cos.grad.tolist() == pytest.approx(want, rel=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_at_cos_one_is_that_of_the_nearest_representable_angle(dtype):
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    below_one = float(np.nextafter(np_dtype(1.0), np_dtype(0.0)))
    cos = torch.tensor([1.0, below_one, -1.0, -below_one], dtype=dtype, requires_grad=True)
    target_logit("arcface", cos, grad="exact", fallback=True).sum().backward()
    g = cos.grad.tolist()
    assert all(math.isfinite(v) for v in g)
    assert g[0] == pytest.approx(g[1], rel=1e-3)  # no cliff between cos = 1 and the next value below
    assert g[0] == pytest.approx(dpsi_dcos_ref("arcface", below_one), rel=1e-3)


def curricular_target_grad(cos_target: torch.Tensor) -> torch.Tensor:
    """d logit[i, 0] / d cos[i, 0] / s, one row per target cosine; non-targets far below it."""
    n = cos_target.shape[0]
    block = torch.cat([cos_target.detach().unsqueeze(1), torch.full((n, 2), 0.1, dtype=cos_target.dtype)], 1)
    block.requires_grad_()
    out = CurricularFace(m=0.5, s=64.0)(MarginInput.single(block, torch.zeros(n, dtype=torch.long)))
    out.logits[:, 0].sum().backward()
    return block.grad[:, 0] / 64.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_curricularface_exact_gradient_below_1e3_rad(dtype):
    angles = ANGLES if dtype == torch.float64 else ANGLES[:2]
    cos = cosines(angles, dtype)
    got = curricular_target_grad(cos).tolist()
    want = [dpsi_dcos_ref("arcface", float(c)) for c in cos]  # cos(theta + m), as head/metrics.py
    assert got == pytest.approx(want, rel=1e-8 if dtype == torch.float64 else 2e-5)


def test_magface_exact_gradient_below_1e3_rad():
    cos = cosines(ANGLES, torch.float64)
    n = cos.shape[0]
    block = torch.cat([cos.unsqueeze(1), torch.full((n, 2), -0.3, dtype=torch.float64)], 1).requires_grad_()
    norms = torch.full((n,), 60.0, dtype=torch.float64, requires_grad=True)
    out = MagFace(s=64.0)(MarginInput.single(block, torch.zeros(n, dtype=torch.long), norms))
    out.logits[:, 0].sum().backward()
    m = (0.8 - 0.45) / (110.0 - 10.0) * (60.0 - 10.0) + 0.45  # models/magface.py _margin
    want = [dpsi_dcos_ref("arcface", float(c), m) for c in cos]
    assert (block.grad[:, 0] / 64.0).tolist() == pytest.approx(want, rel=1e-8)
    # and in the norm: d cos(theta + m(a)) / da = -sin(theta + m) * m'(a)
    slope = (0.8 - 0.45) / (110.0 - 10.0)
    want_a = [float(-mpmath.sin(encoded_theta(float(c)) + m) * slope) for c in cos]
    assert (norms.grad / 64.0).tolist() == pytest.approx(want_a, rel=1e-10)


# ----------------------------------------------------------------------------- running statistics
STAT_COS = [
    [[0.62, 0.1, -0.3, 0.05], [0.2, 0.71, 0.0, -0.4], [0.3, -0.1, 0.2, 0.9], [0.5, 0.48, 0.1, 0.2]],
    [[0.55, 0.2, -0.1, 0.0], [0.1, 0.77, 0.3, -0.2], [0.4, 0.0, 0.1, 0.81], [0.6, 0.3, 0.2, 0.1]],
    [[0.66, 0.0, -0.2, 0.15], [0.3, 0.69, 0.1, -0.3], [0.2, -0.2, 0.3, 0.85], [0.45, 0.5, 0.0, 0.3]],
]
STAT_LABELS = torch.tensor([0, 1, 3, -1])
STAT_NORMS = [[18.0, 25.0, 31.0, 40.0], [22.0, 19.0, 35.0, 12.0], [27.0, 24.0, 16.0, 30.0]]


def ema_ref(values: list[float], start: float, weight: float, store) -> list[float]:
    """EMA in float64, each step stored through ``store`` (the buffer's rounding)."""
    out, v = [], start
    for x in values:
        v = store(weight * x + (1 - weight) * v)
        out.append(v)
    return out


def f32(v: float) -> float:
    return float(np.float32(v))


def run_statistics(margin, dtype: torch.dtype, autocast: bool = False) -> list[list[float]]:
    """Feed the three batches (cast to ``dtype``) in training mode; the statistics after each."""
    margin.train()
    seen = []
    for cos, norms in zip(STAT_COS, STAT_NORMS):
        c = torch.tensor(cos, dtype=torch.float64).to(dtype)
        a = torch.tensor(norms, dtype=torch.float64).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            margin(MarginInput.single(c, STAT_LABELS, a))
        seen.append([float(b) for b in margin.buffers()])
    return seen


def statistics_ref(kind: str, dtype: torch.dtype, store) -> list[list[float]]:
    """CurricularFace's t / AdaFace's mean and std of the labelled rows, from the inputs as
    ``dtype`` represents them."""
    rows = []
    for cos, norms in zip(STAT_COS, STAT_NORMS):
        c = torch.tensor(cos, dtype=torch.float64).to(dtype).double()
        a = torch.tensor(norms, dtype=torch.float64).to(dtype).double().clip(0.001, 100)
        lab = STAT_LABELS >= 0
        if kind == "curricularface":
            rows.append([float(c[lab.nonzero().flatten(), STAT_LABELS[lab]].mean())])
        else:
            rows.append([float(a[lab].mean()), float(a[lab].std())])
    if kind == "curricularface":
        return [[v] for v in ema_ref([r[0] for r in rows], 0.0, 0.01, store)]
    means = ema_ref([r[0] for r in rows], 20.0, 0.01, store)
    stds = ema_ref([r[1] for r in rows], 100.0, 0.01, store)
    return [list(p) for p in zip(means, stds)]


KINDS = {"curricularface": CurricularFace, "adaface": AdaFace}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_statistics_stay_float32_when_the_model_is_cast_down(kind, cast):
    margin = getattr(KINDS[kind](), cast)() if cast == "half" else KINDS[kind]().to(torch.bfloat16)
    assert {b.dtype for b in margin.buffers()} == {torch.float32}
    got = run_statistics(margin, torch.float32)
    assert {b.dtype for b in margin.buffers()} == {torch.float32}
    want = statistics_ref(kind, torch.float32, f32)
    assert np.allclose(got, want, rtol=0, atol=2e-7)  # bf16 buffers were 1e-3 off (and stalled)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("dtype", "autocast"), [(torch.bfloat16, True), (torch.float16, False), (torch.float32, False)])
def test_statistics_are_float32_for_low_precision_inputs(kind, dtype, autocast):
    got = run_statistics(KINDS[kind](), dtype, autocast)
    want = statistics_ref(kind, dtype, f32)  # the inputs' own rounding, stored as float32
    assert np.allclose(got, want, rtol=0, atol=2e-7)


@pytest.mark.parametrize("kind", list(KINDS))
def test_statistics_float64_only_after_double(kind):
    margin = KINDS[kind]().double()
    got = run_statistics(margin, torch.float64)
    assert {b.dtype for b in margin.buffers()} == {torch.float64}
    assert np.allclose(got, statistics_ref(kind, torch.float64, float), rtol=1e-15, atol=0)
    # a float32 margin fed float64 keeps float32 statistics (documented)
    margin = KINDS[kind]()
    got = run_statistics(margin, torch.float64)
    assert {b.dtype for b in margin.buffers()} == {torch.float32}
    assert np.allclose(got, statistics_ref(kind, torch.float64, f32), rtol=0, atol=2e-7)


def test_head_cast_to_bf16_keeps_the_statistics_float32_and_trains():
    torch.manual_seed(0)
    head = MarginHead(8, 5, margin="curricularface").to(torch.bfloat16)
    assert head.weight.dtype == torch.bfloat16 and head.margin.t.dtype == torch.float32
    x = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = head.loss(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and head.margin.t.dtype == torch.float32 and float(head.margin.t) != 0.0


# ----------------------------------------------------------------------------- validation
BAD = [
    (lambda: MagFace(easy_margin="no"), r"magface: easy_margin must be true or false \(a bool\); got 'no'"),
    (lambda: MagFace(easy_margin=None), "easy_margin must be true or false"),
    (lambda: MagFace(easy_margin=1), "easy_margin must be true or false"),
    (lambda: build_margin("magface", easy_margin="false"), "easy_margin must be true or false"),
    (lambda: Margin("arcface", fallback="no"), r"'arcface': fallback must be true or false"),
    (lambda: MarginHead(4, 3, margin="arcface", fallback="yes"), "fallback must be true or false"),
    (lambda: Margin("cosface", m="0.35"), r"'cosface': m must be a number in \[0, 1\]; got '0.35'"),
    (lambda: Margin("expface", m=True), r"'expface': m must be a number in \(0, 1\]; got True"),
    (lambda: Margin("expface", s="64"), "s must be a number"),
    (lambda: Margin("combined", m3=None), "m3 must be a number"),
    (lambda: Margin(["arcface"]), "unknown margin"),
    (lambda: CurricularFace(m="0.5"), "curricularface: m must be a number"),
    (lambda: CurricularFace(momentum=True), "momentum must be a number"),
    (lambda: AdaFace(h=False), "adaface: h must be a number"),
    (lambda: AdaFace(t_alpha="0.01"), "t_alpha must be a number"),
    (lambda: MagFace(l_a="10"), "magface: l_a must be a number"),
    (lambda: MagFace(lambda_g=True), "lambda_g must be a number"),
    (lambda: SphereFaceR(m=None), "sphereface_r: m must be a number"),
    (lambda: SphereFaceR(s=True), "s must be a number"),
    (lambda: MarginHead(4, 3, subcenters=2.0), "subcenters must be a positive integer; got 2.0"),
    (lambda: MarginHead(True, 3), "embedding_size must be a positive integer; got True"),
    (lambda: PartialFCHead(4, 3, sample_rate="0.2", seed=0), r"sample_rate must be a number in \(0, 1\]"),
    (lambda: PartialFCHead(4, 3, sample_rate=True, seed=0), "sample_rate must be a number"),
    (lambda: PartialFCHead(4, 3, ddp_grad_scale="no", seed=0), "ddp_grad_scale must be true or false"),
    (lambda: MarginHead(4, 3, objective="uniface", objective_params={"lam": True}), "lam must be a number"),
    (lambda: MarginHead(4, 3, objective="uniface", objective_params={"lam": "1"}), "lam must be a number"),
]


@pytest.mark.parametrize(("build", "message"), BAD)
def test_every_invalid_parameter_is_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_valid_numbers_of_any_real_type_are_accepted():
    assert Margin("expface", m=np.float32(0.5)).params["m"] == 0.5
    assert Margin("sphereface", m=2).params["m"] == 2.0
    assert Margin("arcface", fallback=np.bool_(True)).params["fallback"] is True
    assert MagFace(easy_margin=False, l_a=np.int64(10)).l_a == 10.0


# ----------------------------------------------------------------------------- dynamic margins
def authors_m(name: str, cos: list[list[float]], labels: list[int], s: float) -> float:
    """PowerFace_d / ArcFace_d / SphereFace_d of the ExpFace authors' losses.py (balanced), with
    Python floats and no clamp of any kind: NaN/inf where theirs is."""
    c = len(cos[0])
    pos = [row[y] for row, y in zip(cos, labels) if y >= 0]
    neg = [v for row, y in zip(cos, labels) if y >= 0 for j, v in enumerate(row) if j != y]
    p, n = sum(pos) / len(pos), sum(neg) / len(neg)
    theta_p, phi = math.acos(p), math.acos(n + math.log(c - 1) / s)
    if name == "expface":
        return math.log(phi / math.pi) / math.log(theta_p / math.pi)
    if name == "arcface":
        return phi - theta_p
    return phi / theta_p


def dynamic_m(name: str, cos: list[list[float]], labels: list[int], s: float) -> torch.Tensor:
    block = torch.tensor(cos, dtype=torch.float64, requires_grad=True)
    out = Margin(name, s=s, dynamic="balanced", grad="exact")(MarginInput.single(block, torch.tensor(labels)))
    out.logits.sum().backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(block.grad).all()
    return out.logs["m"]


SMALL_THETA = math.cos(5e-4)  # every target at 5e-4 rad: theta_P below the old 1e-3 clamp


@pytest.mark.parametrize("name", ["expface", "arcface", "sphereface"])
def test_dynamic_m_equals_the_authors_wherever_theirs_is_finite(name):
    cos = [[SMALL_THETA, 0.1, -0.2, 0.3], [0.05, SMALL_THETA, 0.2, -0.1], [0.0, 0.3, 0.1, SMALL_THETA]]
    labels = [0, 1, 3]
    want = authors_m(name, cos, labels, 64.0)
    assert math.isfinite(want)
    assert dynamic_m(name, cos, labels, 64.0).item() == pytest.approx(want, rel=1e-9)


def test_dynamic_m_where_the_authors_give_nan_n_plus_b_above_one():
    # s = 1, C = 4: b = ln 3 = 1.0986 > 1, so acos(N + b) is NaN in their code: here acos(1) = 0
    cos = [[0.5, 0.1, -0.2, 0.3], [0.05, 0.4, 0.2, -0.1]]
    labels = [0, 1]
    with pytest.raises(ValueError):
        authors_m("arcface", cos, labels, 1.0)  # math.acos: domain error (torch: NaN)
    theta_p = math.acos(0.45)
    assert dynamic_m("arcface", cos, labels, 1.0).item() == pytest.approx(-theta_p, rel=1e-12)
    assert dynamic_m("sphereface", cos, labels, 1.0).item() == 0.0
    # ExpFace: log(0) = -inf, still not finite: acos(N + b) clamped to THETA_EPS
    want = math.log(THETA_EPS / math.pi) / math.log(theta_p / math.pi)
    assert dynamic_m("expface", cos, labels, 1.0).item() == pytest.approx(want, rel=1e-12)


def test_dynamic_m_when_every_target_is_at_cos_one():
    cos = [[1.0, 0.1, -0.2, 0.3], [0.05, 1.0, 0.2, -0.1]]
    labels = [0, 1]
    phi = math.acos(sum([0.1, -0.2, 0.3, 0.05, 0.2, -0.1]) / 6 + math.log(3) / 64.0)
    # theirs: SphereFace phi / 0 = inf -> theta_P clamped to THETA_EPS
    assert dynamic_m("sphereface", cos, labels, 64.0).item() == pytest.approx(phi / THETA_EPS, rel=1e-9)
    # theirs: ExpFace log(phi/pi) / log(0) = -0.0, finite: kept
    assert dynamic_m("expface", cos, labels, 64.0).item() == 0.0
    assert dynamic_m("arcface", cos, labels, 64.0).item() == pytest.approx(phi, rel=1e-12)


def test_sphereface_scale_is_30_static_and_dynamic():
    """s = 30 (opensphere's and the ExpFace authors' SphereFace class default), also with
    ``dynamic`` (their SphereFace_d defaults to 32, their configs set s = 32, m = 1.7): b uses it."""
    assert (Margin("sphereface").s, Margin("sphereface").params) == (30.0, {"m": 1.5})
    dyn = Margin("sphereface", dynamic="balanced")
    assert dyn.s == 30.0
    cos = [[0.5, 0.1, -0.2, 0.3], [0.05, 0.4, 0.2, -0.1]]
    assert dynamic_m("sphereface", cos, [0, 1], 30.0).item() == pytest.approx(authors_m("sphereface", cos, [0, 1], 30.0))
    conf = (Path(__file__).resolve().parents[1] / "conf/loss/sphereface.yaml").read_text()
    assert "\ns: 30.0" in conf


# ----------------------------------------------------------------------------- sub-centres
def subcenter_arcface_ref(x, w, labels, k, exact, m=0.5, s=64.0):
    """insightface's MXNet Sub-center ArcFace symbol (train_parall.py, loss_K > 1, combined margin
    with m1 = 1, m2 = m, m3 = 0) in float64 torch; ``exact=False`` blocks the margin's gradient."""
    x_n = x / x.norm(dim=1, keepdim=True)
    w_n = w / w.norm(dim=1, keepdim=True)
    fc7 = (x_n @ w_n.t()).view(x.shape[0], -1, k).amax(dim=2)  # reshape (-1, C, K), max(axis=2)
    onehot = F.one_hot(labels, fc7.shape[1]).to(fc7.dtype)
    cos_t = fc7 * onehot
    diff = torch.cos(torch.arccos(cos_t) + m) * onehot - cos_t
    logits = (fc7 + (diff if exact else diff.detach())) * s
    return F.cross_entropy(logits, labels)


def test_subcentres_with_grad_exact_give_the_original_gradient_and_the_default_differs():
    torch.manual_seed(0)
    n, d, c, k = 6, 8, 5, 3
    x = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(c * k, d, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    grads = {}
    for exact in (True, False):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        subcenter_arcface_ref(xr, wr, labels, k, exact).backward()
        head = MarginHead(d, c, margin="arcface", subcenters=k, **({"grad": "exact"} if exact else {})).double()
        head.weight.data.copy_(w)
        xh = x.clone().requires_grad_()
        head.loss(xh, labels).backward()
        torch.testing.assert_close(xh.grad, xr.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)
        grads[exact] = xr.grad
    # the default (grad=detached, insightface's arcface_torch) is not the original's gradient
    assert (grads[True] - grads[False]).abs().max() > 1e-3


def test_readme_states_how_the_defaults_differ_from_the_authors_code():
    text = README.read_text()
    assert "`head.subcenters=K` with `loss.grad=exact`" in text  # Sub-center ArcFace's gradient
    assert "every tied sub-centre" in text
    assert "SphereFace_d" in text and "s = 32" in text
    assert "running statistics" in text and "float32" in text
