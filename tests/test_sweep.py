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
