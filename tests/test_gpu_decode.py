"""GPU JPEG decode: batching of encoded bytes, the CPU fallback, equality with the CPU decoder."""

from __future__ import annotations

import io
from contextlib import nullcontext

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from facemargin.data.formats.image import CorruptImageError
from facemargin.data.loading.device_decode import NO_CUDA_MESSAGE, JpegBatchDecoder, collate_encoded, split_encoded


def photo(seed: int, h: int = 24, w: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    return np.array(Image.fromarray(low).resize((w, h), Image.BILINEAR))


def jpeg(seed: int, **kw) -> bytes:
    return simplejpeg.encode_jpeg(photo(seed, **kw), quality=int(60 + 5 * (seed % 7)), colorspace="RGB")


def test_collate_and_split_round_trip():
    payloads = [b"abc", bytearray(b"defgh"), torch.tensor([1, 2], dtype=torch.uint8), np.frombuffer(b"", np.uint8)]
    data, lengths = collate_encoded(payloads)
    assert data.dtype == torch.uint8 and data.shape == (4, 5) and lengths.tolist() == [3, 5, 2, 0]
    assert data[0, 3:].tolist() == [0, 0] and data[2].tolist() == [1, 2, 0, 0, 0]
    rows = split_encoded(data, lengths)
    assert [bytes(r.tolist()) for r in rows] == [b"abc", b"defgh", b"\x01\x02", b""]
    assert all(r.is_contiguous() for r in rows)  # what decode_jpeg needs
    with pytest.raises(ValueError, match="empty batch"):
        collate_encoded([])
    with pytest.raises(ValueError, match=r"lengths outside \[0, 5\]"):
        split_encoded(data, torch.tensor([3, 6, 2, 0]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_without_cuda_the_decoder_falls_back_to_the_cpu_pipeline_with_a_message():
    with pytest.warns(RuntimeWarning, match="CUDA is not available.*use data.decode=cpu"):
        decoder = JpegBatchDecoder("cuda")
    assert decoder.device == torch.device("cpu") and decoder.warned and "decode=gpu" in NO_CUDA_MESSAGE
    encoded = [jpeg(i) for i in range(5)]
    out = decoder(*collate_encoded(encoded))
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 24, 24)
    for img, data in zip(out, encoded):  # exactly the workers' decoder
        assert torch.equal(img, torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_batch_decode_matches_the_cpu_decoder(device):
    encoded = [jpeg(i, h=32, w=40) for i in range(6)]
    buf = io.BytesIO()
    Image.fromarray(photo(9, 32, 40)).save(buf, format="PNG")  # not a JPEG: decoded on the CPU
    encoded.append(buf.getvalue())
    out = JpegBatchDecoder(device)(*collate_encoded(encoded))
    assert out.shape == (7, 3, 32, 40) and out.device.type == device
    for k, data in enumerate(encoded[:6]):
        ref = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert (out[k].cpu().int() - ref.int()).abs().max() <= 2  # decoders agree within JPEG rounding
    assert torch.equal(out[6].cpu(), torch.from_numpy(photo(9, 32, 40)).permute(2, 0, 1))  # PNG is lossless


def test_bad_batches_name_the_image():
    decoder = JpegBatchDecoder("cpu")
    with pytest.raises(ValueError, match=r"image 2 is \(3, 16, 24\) but image 0 is \(3, 24, 24\)"):
        decoder(*collate_encoded([jpeg(0), jpeg(1), jpeg(2, h=16)]))
    broken = jpeg(3)[:40]
    with pytest.raises(CorruptImageError, match="JPEG batch: image 1: cannot decode"):
        decoder(*collate_encoded([jpeg(0), broken]))


def test_datamodule_gpu_decode_gives_the_cpu_pipelines_batches(tmp_path):
    from facemargin.data.loading.device_decode import EncodedBatch
    from facemargin.data.module import FaceRecordDataModule
    from facemargin.data.tools.synthetic import make_demo_dataset

    root = make_demo_dataset(tmp_path / "set", num_identities=5, images_per_identity=4, num_val_identities=2,
                             num_val_pairs=10, image_size=24, seed=1)
    kw = dict(batch_size=6, num_workers=0, seed=3, flip_p=0.5)
    cpu = FaceRecordDataModule(root, **kw)
    gpu = FaceRecordDataModule(root, decode="gpu", **kw)
    with pytest.raises(ValueError, match="decode must be 'cpu' or 'gpu', got 'nvjpeg'"):
        FaceRecordDataModule(root, decode="nvjpeg", **kw)
    want = list(cpu.train_dataloader())
    shipped = list(gpu.train_dataloader())
    assert isinstance(shipped[0][0], EncodedBatch) and shipped[0][0].data.dtype == torch.uint8
    with pytest.warns(RuntimeWarning, match="CUDA is not available") if not torch.cuda.is_available() else nullcontext():
        got = [gpu.on_before_batch_transfer(b, 0) for b in shipped]
    assert len(got) == len(want) == 3
    for (x, y, i), (xw, yw, iw) in zip(got, want):
        assert torch.equal(i, iw) and torch.equal(y, yw) and torch.equal(x.cpu(), xw)
    flips = torch.cat([b[0].flip for b in shipped])
    assert 0 < int(flips.sum()) < len(flips)  # flipped on the device side, as the workers would


def test_a_damaged_body_behind_a_sound_header_names_its_record(tmp_path):
    """The workers check headers only; the device decoder finds the rest and names the record."""
    from facemargin.data.module import FaceRecordDataModule
    from facemargin.data.tools.pack import write_faceset

    images = [jpeg(k, h=24, w=24) for k in range(6)]
    images[4] = images[4][: images[4].index(b"\xff\xda") + 40]  # headers intact, scan cut short
    root = write_faceset(tmp_path / "set", [0, 0, 0, 1, 1, 1], images, 2, (24, 24))
    dm = FaceRecordDataModule(root, batch_size=6, num_workers=0, seed=0, decode="gpu")
    (batch,) = list(dm.train_dataloader())  # shipped without complaint
    with pytest.warns(RuntimeWarning) if not torch.cuda.is_available() else nullcontext():
        with pytest.raises(CorruptImageError, match=r"JPEG batch: sample 4 \(.*train.rec at offset \d+ \(key 5\)\): cannot decode"):
            dm.on_before_batch_transfer(batch, 0)
