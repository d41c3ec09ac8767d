"""The packer's inputs checked before they become a set (issue 19 item 8) and the files it leaves.

A JPEG copied byte for byte is walked to its end-of-image marker (every truncation refused, as
libjpeg's strict decoder refuses it), ``--align`` landmarks outside their photo and one photo
listed twice with different points are refused, a write that fails (a full tmpfs, a file size
limit) names the set's file, and the files get the permissions the umask gives new files.
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from facemargin.data.formats.image import CorruptImageError
from facemargin.data.tools.pack import main as pack_main
from facemargin.data.tools.pack import pack_images

SRC = Path(__file__).resolve().parents[1] / "src"


def photo(seed: int, size: int = 48) -> np.ndarray:
    """Gradients plus noise: a JPEG whose scan data is long and busy."""
    y, x = np.mgrid[0:size, 0:size]
    noise = np.random.default_rng(seed).integers(0, 60, (size, size, 3))
    return (np.stack([3 * x, 3 * y, x + 2 * y], -1) + noise).astype(np.uint8)


def pil_jpeg(rgb: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def strict_decodes(data: bytes) -> bool:
    try:
        simplejpeg.decode_jpeg(data, strict=True)
        return True
    except (ValueError, RuntimeError):
        return False


KINDS = {"baseline": {}, "progressive": {"progressive": True}, "restart markers": {"restart_marker_blocks": 2}}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_walk_refuses_every_truncation_libjpeg_refuses(kind) -> None:
    from facemargin.data.formats.jpeg import walk_jpeg

    data = pil_jpeg(photo(1), **KINDS[kind])
    walked = walk_jpeg(data)
    assert walked.end == len(data) and (walked.height, walked.width) == (48, 48) and walked.precision == 8
    assert walked.frame == (0xC2 if kind == "progressive" else 0xC0)
    assert walk_jpeg(data + b"\0" * 7).end == len(data)  # bytes after EOI: not part of the image
    refused = 0
    for cut in range(len(data) - 1, 1, -1):
        prefix = data[:cut]
        assert not strict_decodes(prefix)  # the reference: libjpeg-turbo in strict mode
        with pytest.raises(CorruptImageError, match="truncated|damaged|not a JPEG"):
            walk_jpeg(prefix)
        refused += 1
    assert refused == len(data) - 2


def test_the_walk_refuses_what_is_no_marker_and_accepts_fill_bytes() -> None:
    from facemargin.data.formats.jpeg import walk_jpeg

    data = pil_jpeg(photo(2))
    sos = data.index(b"\xff\xda")
    filled = data[:sos] + b"\xff\xff" + data[sos:]  # fill bytes before a marker are allowed
    assert strict_decodes(filled) and walk_jpeg(filled).end == len(filled)
    junk = data[:sos] + b"\x12" + data[sos:]
    assert not strict_decodes(junk)
    with pytest.raises(CorruptImageError, match=rf"byte 0x12 at offset {sos} where a marker must be"):
        walk_jpeg(junk)
    with pytest.raises(CorruptImageError, match="no start-of-image"):
        walk_jpeg(b"GIF89a" + data)


def tree_of_jpegs(root: Path, n: int = 4, size: int = 48) -> list[Path]:
    paths = []
    for i in range(n):
        path = root / f"id{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(simplejpeg.encode_jpeg(photo(i, size), quality=90))
        paths.append(path)
    return paths


def test_a_truncated_jpeg_of_the_target_size_is_refused_not_copied(tmp_path, capsys) -> None:
    paths = tree_of_jpegs(tmp_path / "images")
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: len(whole) * 2 // 3])  # the header is intact: only the scan is cut
    with pytest.raises(SystemExit) as refused:
        pack_main([str(tmp_path / "images"), str(tmp_path / "out"), "--quiet"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"facemargin.data.pack: error: cannot pack {paths[1]}: truncated JPEG" in err and "end-of-image marker" in err
    assert not (tmp_path / "out").exists()
    paths[1].write_bytes(whole[:-2])  # only the EOI missing
    with pytest.raises(ValueError, match=rf"cannot pack {paths[1]}: truncated JPEG"):
        pack_images(tmp_path / "images", tmp_path / "out", progress=False)


def test_verify_decode_also_finds_damage_inside_the_scan(tmp_path) -> None:
    from facemargin.data.formats.jpeg import walk_jpeg

    paths = tree_of_jpegs(tmp_path / "images")
    data = bytearray(paths[2].read_bytes())
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    for k in range(start + 10, len(data) - 20, 40):  # scramble the scan, keeping its markers valid
        data[k] = 0x00 if data[k - 1] == 0xFF else 0x5A
    assert not strict_decodes(bytes(data)) and walk_jpeg(bytes(data)).end == len(data)
    paths[2].write_bytes(bytes(data))
    info = pack_images(tmp_path / "images", tmp_path / "markers", progress=False)  # the walk cannot see it
    assert info["num_images"] == 4
    with pytest.raises(ValueError, match=rf"cannot pack {paths[2]}: cannot decode JPEG .* damaged"):
        pack_images(tmp_path / "images", tmp_path / "decoded", progress=False, verify="decode")
    assert not (tmp_path / "decoded").exists()


def align_tree(root: Path) -> tuple[Path, np.ndarray]:
    (root / "id0").mkdir(parents=True)
    Image.fromarray(photo(3, 120)).save(root / "id0" / "p.png")
    Image.fromarray(photo(4, 120)).save(root / "id0" / "q.png")
    marks = np.array([[40.0, 50.0], [80.0, 50.0], [60.0, 70.0], [45.0, 90.0], [75.0, 90.0]])
    return root, marks


def landmark_line(path: str, marks: np.ndarray) -> str:
    return path + " " + " ".join(f"{v:.3f}" for v in marks.reshape(-1)) + "\n"


def test_align_refuses_landmarks_outside_the_photo(tmp_path) -> None:
    root, marks = align_tree(tmp_path / "images")
    outside = marks.copy()
    outside[1] = [130.0, 50.0]  # the right eye beyond the 120-px photo's right edge
    (tmp_path / "marks.txt").write_text(landmark_line("id0/p.png", marks) + landmark_line("id0/q.png", outside))
    with pytest.raises(ValueError, match=r"id0/q\.png: its right eye landmark \(130, 50\) lies outside the 120x120 "
                                         r"photo \(1 of 5 points do\).*landmarks from .*marks\.txt"):
        pack_images(root, tmp_path / "out", align=tmp_path / "marks.txt", progress=False)
    assert not (tmp_path / "out").exists()
    edge = marks.copy()
    edge[1] = [119.5, 50.0]  # the last pixel's outer edge is still inside
    (tmp_path / "edge.txt").write_text(landmark_line("id0/p.png", marks) + landmark_line("id0/q.png", edge))
    assert pack_images(root, tmp_path / "out", align=tmp_path / "edge.txt", progress=False)["num_images"] == 2


def test_align_refuses_one_photo_listed_twice_with_other_points(tmp_path, monkeypatch) -> None:
    root, marks = align_tree(tmp_path / "images")
    monkeypatch.chdir(tmp_path)  # the image root given relative, one row written with the absolute path
    rows = landmark_line("id0/p.png", marks) + landmark_line("id0/q.png", marks)
    (tmp_path / "marks.txt").write_text(rows + landmark_line(str(root / "id0" / "q.png"), marks + 3.0))
    with pytest.raises(ValueError, match=r"marks\.txt: .*id0/q\.png and .*id0/q\.png are the same photo with "
                                         r"different landmarks"):
        pack_images("images", "out", align="marks.txt", progress=False)
    (tmp_path / "same.txt").write_text(rows + landmark_line(str(root / "id0" / "q.png"), marks))  # agreeing rows
    assert pack_images("images", "out", align="same.txt", progress=False)["num_images"] == 2
    (tmp_path / "dup.txt").write_text(rows + landmark_line("id0/./q.png", marks + 1.0))  # the shared reader's check
    with pytest.raises(ValueError, match=r"dup\.txt: line 3 gives id0/\./q\.png other landmarks than line 2"):
        pack_images("images", "out2", align="dup.txt", progress=False)


def test_pack_files_get_the_umask_permissions(tmp_path) -> None:
    tree_of_jpegs(tmp_path / "images")
    old = os.umask(0o022)
    try:
        pack_images(tmp_path / "images", tmp_path / "shared", progress=False)
        os.umask(0o077)
        pack_images(tmp_path / "images", tmp_path / "private", progress=False)
    finally:
        os.umask(old)
    for name in ("train.rec", "train.idx", "property"):
        assert stat.S_IMODE((tmp_path / "shared" / name).stat().st_mode) == 0o644, name
        assert stat.S_IMODE((tmp_path / "private" / name).stat().st_mode) == 0o600, name


def _pack_command(images: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "facemargin.data.pack", str(images), str(out), "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_file_size_limit_names_the_file(tmp_path) -> None:
    tree_of_jpegs(tmp_path / "images", n=16, size=96)
    out = tmp_path / "out"

    def limit() -> None:  # the kernel refuses writes past 8 KiB (Python ignores SIGXFSZ: EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    res = subprocess.run(_pack_command(tmp_path / "images", out), capture_output=True, text=True, env=_env(),
                         preexec_fn=limit)
    assert res.returncode == 2, res.stderr
    assert "File too large" in res.stderr and f"cannot write {out / 'train.rec'}" in res.stderr, res.stderr
    assert not out.exists()  # no temporaries left behind


def test_a_full_disk_names_the_file(tmp_path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user and mount namespaces here (unshare -rm) to mount a small tmpfs; "
                    "test_a_file_size_limit_names_the_file covers the naming")
    tree_of_jpegs(tmp_path / "images", n=24, size=96)
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "set"
    script = f"mount -t tmpfs -o size=16k none {disk} && exec {' '.join(_pack_command(tmp_path / 'images', out))}"
    res = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env())
    assert res.returncode == 2, res.stderr
    assert "No space left on device" in res.stderr and f"cannot write {out / 'train.rec'}" in res.stderr, res.stderr
