"""What every entry point shares: ``key=value`` arguments with a fast ``--help``, and one clear line
instead of a traceback for a user's mistake.

Stdlib only, so ``python -m facemargin.X --help`` answers before torch is imported: an entry point
parses its arguments with :func:`parse_kv_args` first and imports the heavy modules inside its
``run`` function, which :func:`run_cli` calls::

    OPTIONS = {"out": Option("embeddings.npy", "where the embeddings go (.npy)"), ...}

    def main(argv=None) -> None:
        args = parse_kv_args(argv, "facemargin.embed", __doc__, {"MODEL": "...", "IMAGES": "..."}, OPTIONS)
        run_cli(lambda: _run(args), "facemargin.embed")

:func:`run_cli` turns a :class:`~facemargin.errors.UserError` (and an ``OSError`` that names its
file: not found, permission denied, disk full) into ``<prog>: error: <message>`` plus
``hint: <hint>`` where the raiser gave one, and exits with status 2; Ctrl-C exits 130 with one
line. Anything else is a bug and keeps its traceback. ``FACEMARGIN_DEBUG=1`` shows the traceback
of a user error too.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

from .errors import UserError

__all__ = ["EXIT_USER_ERROR", "Option", "error_line", "parse_kv_args", "run_cli"]

T = TypeVar("T")

#: Exit status of an entry point stopped by a user's mistake (argparse's convention).
EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Option:
    """A ``key=value`` option: its default (a string, as typed) and a one-line help."""

    default: str
    help: str


def _usage(prog: str, positional: Mapping[str, str], options: Mapping[str, Option]) -> str:
    return f"usage: python -m {prog} {' '.join(positional)}{' [key=value ...]' if options else ''}".rstrip()


def _help_text(prog: str, summary: str, positional: Mapping[str, str], options: Mapping[str, Option]) -> str:
    lines = [_usage(prog, positional, options), "", summary.strip().split("\n\n")[0].strip(), ""]
    width = max([len(n) for n in positional] + [len(f"{k}={o.default}") for k, o in options.items()] + [0]) + 2
    if positional:
        lines.append("arguments:")
        lines += [f"  {name:<{width}}{text}" for name, text in positional.items()]
    if options:
        lines.append("options (key=value):")
        lines += [f"  {f'{k}={o.default}':<{width}}{o.help}" for k, o in options.items()]
    return "\n".join(lines)


def parse_kv_args(
    argv: Sequence[str] | None,
    prog: str,
    summary: str,
    positional: Mapping[str, str],
    options: Mapping[str, Option],
) -> dict[str, str]:
    """``NAME ... key=value ...`` -> ``{positional name: value, option: value}`` (defaults filled in).

    ``-h`` / ``--help`` prints the usage, the first paragraph of ``summary`` and one line per
    argument and option, then exits 0. An unknown option (with the closest known one suggested) or
    a missing or extra positional argument exits 2 with one line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(_help_text(prog, summary, positional, options))
        raise SystemExit(0)
    values = [a for a in args if "=" not in a or a.startswith(("/", "./", "../"))]
    pairs = [a.split("=", 1) for a in args if a not in values]
    try:
        for key, _ in pairs:
            if key not in options:
                close = difflib.get_close_matches(key, list(options), n=1)
                raise UserError(f"unknown option {key!r}" + (f" (did you mean {close[0]}=?)" if close else "")
                                + f"; options: {', '.join(options) or 'none'}")
        if len(values) != len(positional):
            got = f"got {len(values)}: {' '.join(values)}" if values else "got none"
            raise UserError(f"expected {len(positional)} argument(s) {' '.join(positional)}, {got}",
                            hint=_usage(prog, positional, options))
    except UserError as err:
        _exit_user_error(prog, err)
    return {**{k: o.default for k, o in options.items()}, **dict(zip(positional, values)), **dict(pairs)}


def error_line(err: BaseException) -> str:
    """The one line a user error is reported with (its message; an ``OSError``'s strerror and file).

    An error raised in a DataLoader worker reaches the main process with the worker's traceback in
    its message (``Caught X in DataLoader worker process N. Original Traceback ...``): the line is
    the original message, the traceback's last line.
    """
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.filename is not None:
        what = err.strerror or type(err).__name__
        return f"{err.filename}: {what}" + (f" -> {err.filename2}" if err.filename2 else "")
    text = str(err) or type(err).__name__
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        original = re.match(r"[\w.]+: (.*)", last)
        text = original.group(1) if original else last
    return text


def _is_user_error(err: BaseException) -> bool:
    return isinstance(err, UserError) or (isinstance(err, OSError) and getattr(err, "filename", None) is not None)


def _exit_user_error(prog: str, err: BaseException) -> None:
    print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
    hint = getattr(err, "hint", None)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def run_cli(run: Callable[[], T], prog: str, user_errors: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``run()``; a user's mistake ends the process with one line and status 2 (see module doc).

    ``user_errors``: further exception types this entry point reports the same way (e.g. Hydra's
    config composition errors in the Hydra entry points).
    """
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as err:  # noqa: BLE001 -- re-raised unless it is a user error
        if isinstance(err, SystemExit) or os.environ.get("FACEMARGIN_DEBUG") == "1":
            raise
        if _is_user_error(err) or isinstance(err, user_errors):
            _exit_user_error(prog, err)
        raise
