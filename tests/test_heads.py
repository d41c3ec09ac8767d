"""MarginHead: logits, loss, gradient modes, autocast, bad labels, README snippet."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facemargin import Margin, MarginHead

README = Path(__file__).resolve().parents[1] / "README.md"


def manual_logits(x, w, labels, psi, s, detached=True):
    """What the head must compute, written out with plain ops."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    target = cos.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    new = psi(target.detach() if detached else target)
    delta = (new - target).detach() if detached else new - target
    onehot = F.one_hot(labels.clamp(min=0), w.shape[0]).float() * (labels >= 0).float()[:, None]
    return s * (cos + onehot * delta[:, None])


def expface_psi(c):
    theta = torch.acos(c.clamp(-1, 1))
    return torch.cos(math.pi * (theta / math.pi) ** 0.7)


@pytest.mark.parametrize("grad", ["detached", "exact"])
def test_logits_loss_and_gradients_match_manual(grad):
    torch.manual_seed(0)
    head = MarginHead(16, 10, margin="expface", grad=grad)
    x = torch.randn(8, 16, requires_grad=True)
    labels = torch.tensor([0, 3, 9, -1, 4, 4, 1, 7])
    loss = head.loss(x, labels)
    loss.backward()

    x2 = x.detach().clone().requires_grad_(True)
    w2 = head.weight.detach().clone().requires_grad_(True)
    logits = manual_logits(x2, w2, labels, expface_psi, 64.0, detached=(grad == "detached"))
    want = F.cross_entropy(logits, labels, ignore_index=-1)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_inference_and_minus_one_rows_are_scaled_cosines():
    torch.manual_seed(1)
    head = MarginHead(8, 5, margin="arcface")
    x = torch.randn(3, 8)
    with torch.no_grad():
        cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()
    torch.testing.assert_close(head(x), 64.0 * cos)
    with torch.no_grad():
        out = head(x, torch.tensor([-1, 2, -1]))
    torch.testing.assert_close(out[[0, 2]], 64.0 * cos[[0, 2]])
    assert out[1, 2] == pytest.approx(64.0 * math.cos(math.acos(cos[1, 2].item()) + 0.5), abs=1e-4)


def test_bf16_autocast_gives_float32_logits_without_nan():
    torch.manual_seed(2)
    head = MarginHead(32, 50, margin="expface")
    x = torch.randn(16, 32)
    y = torch.randint(0, 50, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x.bfloat16(), y)
        loss = head.loss(x.bfloat16(), y)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head(x.bfloat16().float(), y), rtol=0, atol=1e-4)
    assert torch.isfinite(loss)


def test_margin_object_and_bad_labels():
    head = MarginHead(4, 3, margin=Margin("cosface", s=30.0, m=0.4))
    assert head.margin.s == 30.0 and head.margin.params == {"m": 0.4}
    with pytest.raises(ValueError, match="pass s and margin parameters to Margin"):
        MarginHead(4, 3, margin=Margin("cosface"), s=10.0)
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="integer tensor"):
        head(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        head(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="num_classes must be positive"):
        MarginHead(4, 0)


def test_readme_drop_in_snippet_runs_in_ten_lines():
    text = README.read_text()
    match = re.search(r"<!-- drop-in snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README must contain the drop-in snippet block"
    code = match.group(1)
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 10
    namespace: dict = {}
    exec(compile(code, "README-snippet", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["loss"].requires_grad
