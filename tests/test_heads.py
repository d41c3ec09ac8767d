"""MarginHead and the head contract: logits, loss, gradient modes, autocast, float64, bad input,
the all-unlabelled batch, hook defaults, README snippet."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facemargin import Margin, MarginHead
from facemargin.heads import HeadHooks, HeadOutput, PartialFCHead
from facemargin.margins import available_margins

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


def test_margin_object_and_bad_input():
    head = MarginHead(4, 3, margin=Margin("cosface", s=30.0, m=0.4))
    assert head.margin.s == 30.0 and head.margin.params == {"m": 0.4}
    with pytest.raises(ValueError, match="ready Margin: pass s, m to it, not to the head"):
        MarginHead(4, 3, margin=Margin("cosface"), s=10.0, m=0.2)
    with pytest.raises(ValueError, match="ready Margin: pass grad to it"):  # never silently ignored
        MarginHead(4, 3, margin=Margin("cosface"), grad="exact")
    with pytest.raises(ValueError, match="ready CurricularFace: pass grad"):
        PartialFCHead(4, 3, margin=build("curricularface"), grad="detached")
    with pytest.raises(ValueError, match="has no 'grad' option"):
        MarginHead(4, 3, margin="adaface", grad="exact")
    x = torch.randn(2, 4)
    for bad, err, message in [
        (torch.tensor([0.0, 1.0]), TypeError, "integer tensor"),
        (torch.tensor([True, False]), TypeError, "integer tensor; got torch.bool"),
        (torch.tensor([0, 3]), ValueError, r"labels must lie in \[0, 3\)"),
        (torch.tensor([0, -2]), ValueError, r"or be -1; got range \[-2, 0\]"),
    ]:
        for call in (head, head.loss, head.output, PartialFCHead(4, 3, seed=0).loss):
            with pytest.raises(err, match=message):
                call(x, bad)
    with pytest.raises(ValueError, match="num_classes must be a positive integer; got 0"):
        MarginHead(4, 0)


def build(name):
    from facemargin.margins import build_margin

    return build_margin(name)


def test_three_d_embeddings_are_rejected_also_without_labels():
    head = MarginHead(4, 3)
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 4\]; got \(2, 5, 4\)"):
        head(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 4\]"):
        head.loss(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating-point"):
        head(torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("name", available_margins())
def test_all_unlabelled_batch_gives_zero_with_zero_gradient_in_both_heads(name):
    torch.manual_seed(0)
    labels = torch.full((3,), -1)
    for head in (MarginHead(6, 4, margin=name), PartialFCHead(6, 4, margin=name, seed=0)):
        x = (torch.randn(3, 6) * 20).requires_grad_()
        out = head.output(x, labels)
        out.loss.backward()
        assert out.loss.item() == 0.0 and out.logs["ce"].item() == 0.0, (type(head).__name__, name)
        assert not x.grad.any() and not head.weight.grad.any(), (type(head).__name__, name)


@pytest.mark.parametrize("name", available_margins())
def test_every_loss_logs_what_it_adds(name):
    torch.manual_seed(0)
    head = MarginHead(6, 4, margin=name)
    out = head.output(torch.randn(5, 6) * 20, torch.tensor([0, 1, 2, 3, -1]))
    extra = {"curricularface": {"t"}, "adaface": {"batch_mean", "batch_std"}, "magface": {"magface_g"}}
    assert isinstance(out, HeadOutput) and set(out.logs) == {"ce", *extra.get(name, set())}
    assert all(not v.requires_grad and v.dim() == 0 for v in out.logs.values())
    dyn = MarginHead(6, 4, margin="expface", dynamic="balanced").output(torch.randn(5, 6), torch.tensor([0, 1, 2, 3, -1]))
    assert set(dyn.logs) == {"ce", "m"}


@pytest.mark.parametrize(("name", "params"), [("arcface", {"grad": "exact"}), ("magface", {"s": 8.0}), ("curricularface", {"s": 8.0})])
def test_float64_head_computes_in_float64_and_passes_gradcheck(name, params):
    torch.manual_seed(3)
    head = MarginHead(5, 4, margin=name, **params).double().eval()
    x = (torch.randn(3, 5, dtype=torch.float64) * 20).requires_grad_()
    labels = torch.tensor([1, -1, 3])
    assert head(x, labels).dtype == torch.float64 and head.loss(x, labels).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda e, w: _loss_with_weight(head, e, w, labels), (x, head.weight.detach().clone().requires_grad_()))


def _loss_with_weight(head, x, weight, labels):
    from facemargin.heads.core import margin_block, objective_output

    out = margin_block(head.margin, x, weight, labels, labels >= 0, head.num_classes)
    return objective_output(head.objective, out, labels, labels >= 0).loss


def test_hook_defaults_for_a_head_that_only_has_loss():
    class MyHead(HeadHooks, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def loss(self, embeddings, labels):
            return (embeddings.sum(dim=1) * self.w.sum()).mean()

    head = MyHead()
    out = head.output(torch.ones(3, 2), torch.zeros(3, dtype=torch.long))
    assert isinstance(out, HeadOutput) and out.loss.item() == 4.0 and out.logs == {}
    assert head.ddp_ignored_parameters() == [] and list(head.grad_clip_parameters()) == [head.w]
    ckpt = {"state_dict": {"head.w": torch.ones(2)}}
    head.setup_distributed(), head.attach_optimizer(torch.optim.SGD(head.parameters(), lr=0.1))
    head.on_save_checkpoint(ckpt, "head.", []), head.on_load_checkpoint(ckpt, "head.")
    assert list(ckpt) == ["state_dict"]


def test_readme_drop_in_snippet_runs_in_ten_lines():
    text = README.read_text()
    match = re.search(r"<!-- drop-in snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README must contain the drop-in snippet block"
    code = match.group(1)
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 10
    namespace: dict = {}
    exec(compile(code, "README-snippet", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["loss"].requires_grad
