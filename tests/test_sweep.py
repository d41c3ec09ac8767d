"""The sweep summary by hand: its plot (10-fold std error bars, a title, an honest y-axis) and
one-line errors for a wrong folder."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from matplotlib.container import ErrorbarContainer

from facemargin.sweep import error_bar, main, plot_summary, summarize, y_limits


def write_job(sweep, name: str, overrides: list[str], metrics: dict) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path):
    # four margins whose accuracies differ by less than their 10-fold std (noise, not a cliff)
    for i, (m, acc, std) in enumerate([(0.5, 0.874, 0.031), (0.6, 0.881, 0.028), (0.7, 0.880, 0.030), (0.8, 0.869, 0.035)]):
        write_job(tmp_path, f"{i}_loss.m={m}", ["loss=expface", f"loss.m={m}"],
                  {"val/acc": acc, "val/demo_val/acc": acc, "val/demo_val/acc_std": std, "global_step": 222.0})
    return tmp_path


def test_summary_plot_has_error_bars_a_title_and_an_axis_spanning_the_noise(sweep):
    rows = summarize(sweep)
    assert (sweep / "summary.png").stat().st_size > 1000
    fig = plot_summary(rows, ["loss.m"])
    (ax,) = fig.axes
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    line, _, (vertical,) = bars.lines
    assert list(line.get_xdata()) == [0.5, 0.6, 0.7, 0.8]
    spans = [seg[1][1] - seg[0][1] for seg in vertical.get_segments()]
    assert spans == pytest.approx([2 * 0.031, 2 * 0.028, 2 * 0.030, 2 * 0.035])
    assert "val/acc vs loss.m" in ax.get_title() and "10 folds" in ax.get_title()
    lo, hi = ax.get_ylim()
    assert lo <= 0.869 - 0.035 and hi >= 0.881 + 0.028  # every bar visible
    assert hi - lo >= 6 * 0.028  # the 0.012 spread of the means is a fraction of the axis


def test_error_bar_and_limits_rules():
    two_sets = {"val/acc": 0.9, "val/lfw/acc_std": 0.003, "val/cfp_fp/acc_std": 0.004}
    assert error_bar(two_sets, "val/acc") == pytest.approx(math.sqrt((0.003**2 + 0.004**2) / 2))
    assert error_bar({"val/lfw/acc": 0.99, "val/lfw/acc_std": 0.002}, "val/lfw/acc") == 0.002
    assert math.isnan(error_bar({"train/loss_epoch": 3.0}, "train/loss_epoch"))
    lo, hi = y_limits([0.995, 0.996], [math.nan, math.nan], accuracy=True)  # no std: at least 2 points of accuracy
    assert hi - lo >= 0.02 and hi <= 1.0


def test_missing_or_empty_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as missing:
        main([str(tmp_path / "nope")])
    assert missing.value.code == 2
    assert capsys.readouterr().err == (f"facemargin.sweep: error: {tmp_path / 'nope'}: no such folder\n"
                                       "hint: give a multirun folder, e.g. multirun/2026-11-22/10-00-00\n")
    with pytest.raises(SystemExit) as empty:
        main([str(tmp_path)])
    assert empty.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("facemargin.sweep: error: no finished jobs (*/metrics.json) under ") and err.count("\n") == 1


# --------------------------------------------------------------------------- sweeps that explain themselves
def _margin_gradients(m: float, s: float, target_cos: float = 0.3) -> list:
    """Gradients of the ExpFace head's loss (grad=detached) w.r.t. the embeddings and the centres, a few
    epochs into the demo: 200 classes, 512-d, each embedding at cosine ``target_cos`` to its class centre
    (the others near 0, as random directions in 512-d are)."""
    import torch

    from facemargin.heads import MarginHead

    torch.manual_seed(0)
    head = MarginHead(512, 200, margin="expface", s=s, m=m)
    labels = torch.randint(0, 200, (64,))
    centres = torch.nn.functional.normalize(head.weight.detach()[labels], dim=1)
    noise = torch.nn.functional.normalize(torch.randn(64, 512), dim=1)
    noise = torch.nn.functional.normalize(noise - (noise * centres).sum(1, keepdim=True) * centres, dim=1)
    emb = (target_cos * centres + (1 - target_cos**2) ** 0.5 * noise).requires_grad_()
    head.loss(emb, labels).backward()
    return [emb.grad.clone(), *(p.grad.clone() for p in head.parameters())]


def test_at_s_64_a_detached_margin_does_not_reach_the_gradient_at_s_32_it_does():
    """The mechanism the summary explains: at s = 64 the target's softmax probability is below float32's
    resolution, so m = 0.5 and m = 0.6 give bit for bit the same gradient; at the demo's s = 32 they do
    not (at a target cosine of 0.3, reached within the demo's first epochs)."""
    import torch

    for g5, g6 in zip(_margin_gradients(0.5, 64.0), _margin_gradients(0.6, 64.0)):
        assert torch.equal(g5, g6)
    assert not all(torch.equal(a, b) for a, b in zip(_margin_gradients(0.5, 32.0), _margin_gradients(0.6, 32.0)))


def test_the_demo_config_lets_the_margin_reach_the_gradient():
    """``data=demo`` sets loss.s = 32 (conf/data_tuning/demo.yaml) for every loss; a real set keeps the papers' 64."""
    from hydra import compose, initialize_config_dir

    from facemargin.train import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        demo = compose("config")
        arcface = compose("config", overrides=["loss=arcface"])
        real = compose("config", overrides=["data=recordio", "data.root=/sets/x"])
        pinned = compose("config", overrides=["loss.s=64"])
    assert demo.loss.s == 32.0 and arcface.loss.s == 32.0 and demo.head.margin.s == 32.0
    assert real.loss.s == 64.0 and pinned.loss.s == 64.0


@pytest.mark.slow
def test_summary_flags_identical_weights_and_says_why(tmp_path, demo_env):
    """A margin sweep at s = 64 over one short epoch ends with bitwise-identical weights: the summary says
    so and explains the mechanism (the sweep of the issue, in miniature)."""
    import subprocess
    import sys

    from conftest import TINY_RUN

    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "facemargin.train", "-m", *TINY_RUN, "data.num_workers=0",
                           "trainer.max_epochs=1", "loss.s=64", "loss.m=0.5,0.6", f"hydra.sweep.dir={sweep_dir}"],
                          cwd=tmp_path, env=demo_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (sweep_dir / "summary.md").read_text()
    assert "identical results: jobs 0, 1 (loss.m=0.5; loss.m=0.6) ended with bitwise-identical weights" in summary
    assert "p stays under float32's resolution, 1 - p rounds to 1" in summary and "Here the final training loss is" in summary
    assert "identical results" in proc.stdout  # printed at the end of the sweep too
    assert all(len(p.name) < 160 for p in sweep_dir.iterdir())  # a long command still makes short folder names


def test_summary_does_not_flag_different_weights_and_explains_non_margin_keys(tmp_path):
    import torch

    from facemargin.sweep import explain_identical, identical_weights

    for i, value in enumerate((1.0, 2.0, 1.0)):
        (tmp_path / str(i) / "checkpoints").mkdir(parents=True)
        torch.save({"state_dict": {"w": torch.full((3,), value)}}, tmp_path / str(i) / "checkpoints" / "last.ckpt")
    rows = [{"job": "0", "data.num_workers": 0}, {"job": "1", "data.num_workers": 1}, {"job": "2", "data.num_workers": 2}]
    groups = identical_weights(tmp_path, rows)
    assert [[r["job"] for r in g] for g in groups] == [["0", "2"]]
    note = explain_identical(groups[0], ["data.num_workers"])
    assert note.startswith("identical results: jobs 0, 2 (data.num_workers=0; data.num_workers=2)")
    assert note.endswith("Expected where the setting does not enter the arithmetic (e.g. data.num_workers).")
