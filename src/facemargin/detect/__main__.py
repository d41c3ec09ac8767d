"""Find the face in every photo of a folder and write its 5 landmarks: ``python -m facemargin.detect IMAGES_DIR out=landmarks.txt``.

Writes ``out`` (lines ``relative/path x1 y1 ... x5 y5 score``, insightface's ``*_5pts`` format,
the file ``pack --align`` and ``embed landmarks=`` read) with one face per photo -- the largest
(``choice=largest``) or the most central (``choice=central``) of those scoring at least
``min_score`` -- and ``<out>.noface.txt`` listing the photos where none was found. Reports how
many photos had no face and how many had several. ``detector=NAME`` picks ``conf/detector/NAME.yaml``
(default mtcnn, offline); ``detector.KEY=VALUE`` sets one of its options.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ..cli import Option, parse_kv_args, run_cli

PROG = "facemargin.detect"
POSITIONAL = {"IMAGES_DIR": "folder of photos (.jpg .jpeg .png .bmp .webp), read recursively in sorted order"}
OPTIONS = {
    "out": Option("landmarks.txt", "landmark list to write (paths relative to IMAGES_DIR)"),
    "detector": Option("mtcnn", "detector config conf/detector/NAME.yaml (mtcnn: offline; scrfd: insightface's, fetched)"),
    "detector.KEY": Option("VALUE", "set a detector option, e.g. detector.min_face_size=40"),
    "choice": Option("largest", "which face of a photo with several: largest | central"),
    "min_score": Option("0", "ignore faces scoring below this (on top of the detector's own threshold)"),
    "noface": Option("<out>.noface.txt", "where the list of photos with no face goes"),
    "progress": Option("true", "show a progress bar"),
}


def split_detector_options(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``(the other arguments, {KEY: VALUE} of every detector.KEY=VALUE)``."""
    rest, options = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.startswith("detector.") and len(key) > len("detector."):
            options[key[len("detector."):]] = value
        else:
            rest.append(arg)
    return rest, options


def main(argv: Sequence[str] | None = None) -> None:
    args_in, detector_options = split_detector_options(sys.argv[1:] if argv is None else argv)
    args = parse_kv_args(args_in, PROG, __doc__, POSITIONAL, OPTIONS)
    run_cli(lambda: _run(args, detector_options), PROG)


def _run(args: dict[str, str], detector_options: dict[str, str]) -> None:
    from .landmarks import write_landmarks
    from .pipeline import load_detector
    from .survey import survey_folder

    root = Path(args["IMAGES_DIR"])
    out = Path(args["out"])
    noface = Path(args["noface"]) if args["noface"] != OPTIONS["noface"].default else out.with_suffix(".noface.txt")
    detector = load_detector(args["detector"], **detector_options)
    result = survey_folder(root, detector, args["choice"], _float(args["min_score"], "min_score"),
                           progress=_flag(args["progress"], "progress"))
    out.parent.mkdir(parents=True, exist_ok=True)
    written = write_landmarks(out, result.landmark_rows())
    noface.parent.mkdir(parents=True, exist_ok=True)
    noface.write_text("".join(f"{p}\n" for p in result.no_face))
    print(f"{result.total} photos: {written} faces -> {out} ({detector.name}, {result.choice} face where several)")
    print(f"no face: {len(result.no_face)} photos -> {noface}")
    several = result.several
    print(f"several faces: {len(several)} photos" + (f" (e.g. {', '.join(several[:5])})" if several else ""))


def _float(text: str, key: str) -> float:
    from ..errors import UserError

    try:
        return float(text)
    except ValueError:
        raise UserError(f"{key}={text!r}: expected a number") from None


def _flag(text: str, key: str) -> bool:
    from ..errors import UserError

    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise UserError(f"{key}={text!r}: expected true or false")
    return text.lower() in ("true", "1", "yes")


if __name__ == "__main__":
    main()
