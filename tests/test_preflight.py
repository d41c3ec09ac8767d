"""Caught before the run starts: a set whose images are not the backbone's input size, a set smaller
than one batch, a batch that does not fit in free memory (facemargin.preflight)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from torch import nn

from facemargin.errors import UserError
from facemargin.preflight import (
    GiB,
    MemoryEstimate,
    _saved_bytes,
    check_batches,
    check_input_size,
    check_memory,
    estimate_memory,
    parse_bytes,
)

#: a small demo set of real 112x112 faces (64 training images), so that the default backbone is what is estimated
SMALL_DEMO = ["+data.demo_options.num_identities=16", "+data.demo_options.images_per_identity=4",
              "+data.demo_options.num_val_identities=4", "+data.demo_options.num_val_pairs=20"]


def train(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facemargin.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


# --------------------------------------------------------------------------- the memory estimate
def test_saved_bytes_of_a_small_network_counted_by_hand():
    """Linear(192 -> 16), ReLU, Linear(16 -> 4) on a [2, 3, 8, 8] batch keeps, besides the weights: the
    input (the first layer's input is a view of it) and the ReLU output (saved by ReLU for its
    gradient and by the second layer as its input: one tensor)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert _saved_bytes(net, 2, 8) == 2 * 3 * 8 * 8 * 4 + 2 * 16 * 4


def test_the_meta_trace_keeps_what_a_real_forward_keeps():
    """Traced on the meta device (no memory, no arithmetic), the bytes equal those autograd keeps in a
    real CPU forward of the same network, counted storage by storage."""
    from facemargin.backbones import build_embedder

    net = build_embedder("iresnet_demo", 64, input_size=32, widths=(8, 16, 32), stem_width=8)
    params = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}  # the model's own state
    x = torch.randn(4, 3, 32, 32)
    storages: dict[int, int] = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()}
    kept = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.train()(x)
    assert _saved_bytes(net, 4, 32) == sum(storages.values())


def test_estimate_adds_weights_gradients_optimizer_state_and_head_logits():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
    head = nn.Linear(16, 100, bias=False)  # 100 centres
    sgd, adam = estimate_memory(net, head, 8, optimizer_states=1), estimate_memory(net, head, 8, optimizer_states=2)
    weights = (3 * 8 * 8 * 16 + 16 + 16 * 100) * 4
    assert adam.fixed - sgd.fixed == weights  # one more weight-sized state
    half = estimate_memory(net, head, 8, optimizer_states=1, precision="bf16-mixed")
    assert half.per_sample < sgd.per_sample and half.fixed == sgd.fixed
    assert sgd.per_sample > 6 * 4 * 100  # the head's logits and their gradients, per sample
    assert sgd.bytes(10) == sgd.fixed + 10 * sgd.per_sample


def test_largest_batch_and_the_refusal_message(monkeypatch):
    est = MemoryEstimate(fixed=1 * GiB, per_sample=GiB // 16)
    assert est.largest_batch(3 * GiB) == 32 and est.largest_batch(GiB + 5 * GiB // 16) == 5
    assert est.largest_batch(GiB // 2) == 0
    monkeypatch.setenv("FACEMARGIN_FREE_MEMORY", "3GiB")
    check_memory(est, 32)  # fits exactly
    with pytest.raises(UserError) as refused:
        check_memory(est, 128, what="backbone=iresnet100")
    assert str(refused.value) == ("will not fit: backbone=iresnet100 needs ~9.0 GiB for batch 128, 3.0 GiB free in "
                                  "$FACEMARGIN_FREE_MEMORY; data.batch_size=32 fits")
    assert refused.value.hint.startswith("memory_check=false skips this estimate")
    with pytest.raises(UserError, match=r"needs ~4\.0 GiB for batch 16 \(2 processes\), 3\.0 GiB free .*"
                                        r"data\.batch_size=8 fits"):
        check_memory(est, 16, processes=2)  # CPU processes share the machine
    monkeypatch.setenv("FACEMARGIN_FREE_MEMORY", "512MiB")
    with pytest.raises(UserError, match="even batch 1 needs ~1.1 GiB: a smaller backbone or more memory"):
        check_memory(est, 4)
    assert parse_bytes("2G") == 2 * GiB and parse_bytes("1e9") == 10**9 and parse_bytes("512 MiB") == 512 << 20


def test_a_set_smaller_than_one_batch_and_the_wrong_image_size_are_refused():
    with pytest.raises(UserError, match=r"the training set has 16 samples, fewer than one batch \(64\)") as small:
        check_batches(16, 64)
    assert small.value.hint == "data.batch_size=16"
    check_batches(64, 32, processes=2)

    class Backbone(nn.Module):
        input_size = 112

    with pytest.raises(UserError, match=r"the training images are 250x250 \(/photos\) but the backbone iresnet50 "
                                        r"takes 112x112: the first step would fail") as size:
        check_input_size((250, 250), Backbone(), "/photos", "iresnet50")
    assert "python -m facemargin.data.pack /photos OUT --crop 0.5 --resize 112" in size.value.hint
    assert size.value.hint.endswith("+backbone.input_size=250")
    check_input_size([112, 112], Backbone())


# --------------------------------------------------------------------------- before the Trainer starts
@pytest.mark.slow
def test_photos_of_another_size_are_refused_before_training(demo_env, tmp_path):
    """``data=folder`` on LFW-style 250x250 photos used to fail at step 1 with ``mat1 and mat2 shapes
    cannot be multiplied`` after the whole start-up."""
    rng = np.random.default_rng(0)
    for person in ("alice", "bob"):
        (tmp_path / "photos" / person).mkdir(parents=True)
        for i in range(2):
            img = rng.integers(0, 255, (250, 250, 3), dtype=np.uint8)
            (tmp_path / "photos" / person / f"{i}.jpg").write_bytes(simplejpeg.encode_jpeg(img, colorspace="RGB"))
    proc = train("data=folder", f"data.root={tmp_path / 'photos'}", "data.batch_size=2",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=demo_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (f"facemargin.train: error: the training images are 250x250 ({tmp_path / 'photos'}) but the backbone "
            "iresnet_demo takes 112x112: the first step would fail\n") in proc.stderr
    assert "hint: for a folder of photos: data.crop=0.5 data.resize=112 (the centred half, as LFW frames faces)" \
           in proc.stderr and "data.detect=mtcnn" in proc.stderr
    assert "samples/s" not in proc.stdout and not (tmp_path / "run" / "metrics.csv").exists()  # no step ran


@pytest.mark.slow
def test_a_batch_that_does_not_fit_is_refused_with_the_batch_that_does(demo_env, tmp_path):
    env = {**demo_env, "FACEMARGIN_FREE_MEMORY": "400MiB"}
    proc = train(*SMALL_DEMO, "data.batch_size=64", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    m = re.search(r"facemargin\.train: error: will not fit: backbone=iresnet_demo needs ~([\d.]+) GiB for batch 64, "
                  r"0\.4 GiB free in \$FACEMARGIN_FREE_MEMORY; data\.batch_size=(\d+) fits\n", proc.stderr)
    assert m, proc.stderr[-3000:]
    assert float(m.group(1)) > 0.4 and 0 < int(m.group(2)) < 64
    assert not (tmp_path / "run" / "metrics.csv").exists()
    # the batch it names passes, and memory_check=false skips the estimate
    for i, extra in enumerate(([f"data.batch_size={m.group(2)}"], ["data.batch_size=64", "memory_check=false"])):
        ok = train(*SMALL_DEMO, *extra, "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path / f'ok{i}'}",
                   cwd=tmp_path, env=env)
        assert ok.returncode == 0, ok.stderr[-3000:]


def test_no_free_memory_figure_means_no_refusal(monkeypatch):
    monkeypatch.delenv("FACEMARGIN_FREE_MEMORY", raising=False)
    import facemargin.preflight as preflight

    monkeypatch.setattr(preflight, "free_memory", lambda device="cpu": None)
    check_memory(MemoryEstimate(fixed=1 << 60, per_sample=1), 1)


def test_free_memory_of_this_machine_is_read_from_the_kernel(monkeypatch):
    monkeypatch.delenv("FACEMARGIN_FREE_MEMORY", raising=False)
    from facemargin.preflight import free_memory

    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo on this system: free memory is unknown and the check is skipped")
    free, where = free_memory("cpu")
    assert 0 < free and where.startswith("RAM")
