"""The front door the Hydra entry points share (``train``, ``evaluate``, ``export``, ``clean``).

* ``--help`` answers from the YAML files, before Hydra or torch is imported: the usage, the first
  paragraph of the entry point's docstring, one line per config group (the default and every
  option) and one line per top-level key (its default and the comment beside it in the YAML).
  Hydra's own help stays behind ``--hydra-help``; ``--cfg job`` prints the whole composed config.
* A user's mistake ends with one line and status 2 (:func:`facemargin.cli.run_cli`): Hydra's
  composition errors (an unknown key or group option, a malformed override), a missing mandatory
  value (``???``), an interpolation that does not resolve, a config node that cannot be built
  from the values given (``loss.m=abc``, an unknown keyword), and Lightning's
  ``MisconfigurationException`` (trainer options it refuses). A bug keeps its traceback.

Stdlib only at import time: Hydra is imported when a command runs.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from .cli import run_cli
from .config import config_dir
from .errors import UserError

__all__ = ["answer_help", "config_dir", "help_text", "hydra_main", "read_config", "short_dirname", "user_error_of"]


# --------------------------------------------------------------------------- --help from the YAML
def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> ``("value", "comment")``; a ``#`` inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def read_config(path: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """``(defaults, keys)`` of a primary config: ``(group, default option, comment)`` for each config
    group in its defaults list and ``(key, default, comment)`` for each top-level key (a mapping's
    default is shown as ``{...}``; the ``hydra`` node is left out)."""
    defaults: list[tuple[str, str, str]] = []
    keys: list[tuple[str, str, str]] = []
    block = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t-":
            if block == "defaults":
                item, comment = _split_comment(line.strip().lstrip("-").strip())
                group, sep, choice = item.partition(":")
                if sep and not group.startswith(("override ", "optional ")) and group.strip() != "hydra":
                    defaults.append((group.strip(), choice.strip(), comment))
            elif block is not None and keys and keys[-1][0] == block and keys[-1][1] == "":
                keys[-1] = (block, "{...}", keys[-1][2])
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        block = key.strip()
        if block in ("defaults", "hydra"):
            continue
        value, comment = _split_comment(rest)
        keys.append((block, value, comment))
    return defaults, keys


def _options(group: str) -> list[str]:
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def help_text(prog: str, config_name: str, summary: str) -> str:
    """The ``--help`` of a Hydra entry point (see the module docstring)."""
    defaults, keys = read_config(config_dir() / f"{config_name}.yaml")
    groups = [(f"{g}={c}", ", ".join(_options(g)), comment) for g, c, comment in defaults]
    settings = [(f"{k}={v}" if len(v) <= 40 else f"{k}={v[:37]}...", comment) for k, v, comment in keys]
    width = max([len(a) for a, _, _ in groups] + [len(a) for a, _ in settings] + [0]) + 2
    first = summary.strip().split("\n\n")[0].strip().replace("``", "")
    first = first[:-1] if first.endswith("::") else first  # reST's "::" before a code block
    lines = [f"usage: python -m {prog} [group=option ...] [key=value ...]", "", first, ""]
    if groups:
        lines.append("config groups (group=option; defaults shown):")
        lines += [f"  {a:<{width}}{(c + '; ') if c else ''}options: {opts or 'none'}" for a, opts, c in groups]
    if settings:
        lines.append("options (key=value; defaults shown):")
        lines += [f"  {a:<{width}}{c}" for a, c in settings]
    lines += ["", f"any key of the composed config can be set as key=value; all of them: python -m {prog} --cfg job; "
                  "Hydra's own flags: --hydra-help"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- Hydra's errors as one line
def _first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def _innermost(exc: BaseException) -> BaseException:
    """The first cause that is not one of Hydra's ``InstantiationException`` wrappers."""
    from hydra.errors import InstantiationException

    seen = 0
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None and seen < 20:
        exc, seen = exc.__cause__, seen + 1
    return exc


def _config_mistake(cause: BaseException) -> bool:
    """Whether an error raised while building a node is about the values given (not a bug)."""
    if isinstance(cause, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                          FileExistsError)):
        return True  # a node's path that is not there (or not readable)
    if isinstance(cause, OSError) and getattr(cause, "filename", None):
        return True
    if isinstance(cause, TypeError):  # the node's keys do not fit the callable's signature
        return bool(re.search(r"unexpected keyword argument|missing \d+ required|takes \d+ positional", str(cause)))
    return isinstance(cause, (ValueError, ImportError))  # a value the callable refuses; a _target_ that is not there


def _instantiation_error(exc: BaseException) -> UserError | None:
    text = str(exc)
    key = re.search(r"full_key: (\S+)", text)
    node = key.group(1) if key else None
    cause = _innermost(exc)
    if cause is exc:  # Hydra's own message: e.g. a _target_ that cannot be located
        located = re.match(r"Error locating target '([^']+)'", text)
        if not located:
            return None
        return UserError(f"{node + '._target_' if node else '_target_'}: cannot import {located.group(1)!r}")
    if not _config_mistake(cause):
        return None
    from .cli import error_line

    where = f"{node}: " if node and not str(cause).startswith(node) else ""
    return UserError(f"{where}{error_line(cause)}", hint=getattr(cause, "hint", None))


def _composition_error(exc: BaseException) -> UserError:
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException):
        named = re.search(r"Could not (?:find|load) '([^']+)'", str(exc))
        missing = str(getattr(exc, "missing_cfg_file", "") or (named.group(1) if named else ""))
        group, _, name = missing.rpartition("/")
        options = list(getattr(exc, "options", None) or (_options(group) if group else []))
        if group and options:
            close = difflib.get_close_matches(name, options, n=1)
            return UserError(f"{group}={name}: no such option" + (f" (did you mean {group}={close[0]}?)" if close else ""),
                             hint=f"{group} options: {', '.join(options)}")
        return UserError(_first_line(exc))
    if isinstance(exc, OverrideParseException):
        return UserError(f"cannot read the overrides: {_first_line(exc)}",
                         hint="overrides are key=value, +key=value (a new key), ~key (delete) or group=option; "
                              "quote values with spaces or brackets")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    message = lines[0] if lines else type(exc).__name__
    hint = next((ln for ln in lines[1:] if ln.startswith("To ")), None)
    cause = exc.__cause__
    if cause is not None and _first_line(cause):
        message = f"{message.rstrip('.')}: {_first_line(cause)}"
    return UserError(message, hint=hint)


def user_error_of(exc: BaseException) -> UserError | None:
    """The one-line :class:`UserError` a Hydra or OmegaConf error stands for, or ``None`` (a bug)."""
    if isinstance(exc, UserError):
        return exc
    if type(exc).__name__ == "MisconfigurationException" and type(exc).__module__.startswith("lightning"):
        return UserError(f"trainer: {_first_line(exc)}")  # Lightning refusing the trainer options it was given
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(exc, InstantiationException):
        return _instantiation_error(exc)
    missing = re.search(r"Missing mandatory value: (\S+)", str(exc))
    if isinstance(exc, MissingMandatoryValue) or (isinstance(exc, InterpolationResolutionError) and missing):
        key = missing.group(1) if missing else getattr(exc, "full_key", None)
        return UserError(f"{key} is required: give {key}=...")
    if isinstance(exc, InterpolationResolutionError):
        key = getattr(exc, "full_key", None)
        return UserError(f"{key + ': ' if key else ''}{_first_line(exc)}")
    if isinstance(exc, HydraException):
        return _composition_error(exc)
    return None


def _translated(call: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 -- re-raised unless it stands for a user error
            user = user_error_of(exc)
            if user is None or user is exc:
                raise
            raise user from exc

    return run


# --------------------------------------------------------------------------- sweep folder names
def short_dirname(text: str, limit: int = 120) -> str:
    """``text`` when it is at most ``limit`` characters (a file name has at most 255), otherwise its
    first ``limit - 9`` characters and 8 hex digits of its hash: Hydra names a sweep job's folder
    after every override of the command, which a long command turns into ``File name too long``."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    """``${facemargin.short:...}`` (:func:`short_dirname`), used by ``conf/hydra/default.yaml``."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("facemargin.short"):
        OmegaConf.register_new_resolver("facemargin.short", short_dirname)


# --------------------------------------------------------------------------- the entry point
def answer_help(module_name: str, prog: str, config_name: str, summary: str) -> None:
    """``python -m <prog> --help``: print the help and exit, when called at the top of the entry
    point's module run as ``__main__`` -- before the module imports torch. Otherwise nothing."""
    if module_name == "__main__" and any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(help_text(prog, config_name, summary))
        raise SystemExit(0)


def hydra_main(prog: str, config_name: str, summary: str, task: Callable[[Any], Any]) -> Any:
    """Run ``task(cfg)`` as the Hydra app ``config_name`` with ``sys.argv``: fast ``--help``, and a
    user's mistake (in composition or in the job) reported as one line with status 2."""
    answer_help("__main__", prog, config_name, summary)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing; run_cli reports
    import hydra

    register_resolvers()

    def job(cfg: Any) -> Any:
        # inside the job, so that a user error exits (SystemExit passes through Hydra) before Hydra
        # wraps it as a failed job; a bug is re-raised and keeps its traceback
        return run_cli(_translated(lambda: task(cfg)), prog)

    job.__module__ = prog  # Hydra names the job (and its log file, <name>.log) after this module: train.log
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(job)
    return run_cli(_translated(app), prog)
