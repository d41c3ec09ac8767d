"""One line for the installation mistake that breaks ``import timm``: a torchvision built for another torch.

torchvision's compiled operators are registered against one torch release; paired with another
(``pip install -U torch`` alone, or a CPU torch next to a CUDA torchvision) ``import torchvision``
-- and so ``import timm`` -- fails with ``RuntimeError: operator torchvision::nms does not exist``
or an ``ImportError`` from its C extension, which says nothing about versions.
:func:`import_timm` and :func:`require_compatible_torchvision` turn that into a
:class:`~facemargin.errors.UserError` naming both versions and the ``pip`` command that pairs them
(torch 2.N goes with torchvision 0.(N+15): 2.14 with 0.29). Stdlib only until called.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from .errors import UserError

__all__ = ["expected_torchvision", "import_timm", "mismatch_error", "require_compatible_torchvision"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _torch_version() -> str | None:
    """``torch.__version__`` (with its build suffix, ``+cpu``/``+cu121``, which the dist-info may lack)."""
    try:
        import torch
    except ImportError:
        return _version("torch")
    return str(torch.__version__)


def expected_torchvision(torch_version: str) -> str | None:
    """The torchvision minor series built for ``torch_version`` (``"2.14.1+cpu"`` -> ``"0.29"``)."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    if not m or m.group(1) != "2":
        return None
    return f"0.{int(m.group(2)) + 15}"


def _index_url(torch_version: str) -> str:
    local = torch_version.partition("+")[2]
    return f" --index-url https://download.pytorch.org/whl/{local}" if local else ""


def mismatch_error(cause: BaseException, torch_version: str | None = None,
                   torchvision_version: str | None = None) -> UserError | None:
    """The :class:`UserError` for ``cause`` (an error importing torchvision or timm) when the
    installed torch and torchvision do not pair; ``None`` when they do (then ``cause`` is something else)."""
    torch_version = torch_version or _torch_version()
    torchvision_version = torchvision_version or _version("torchvision")
    if not torch_version or not torchvision_version:
        return None
    wanted = expected_torchvision(torch_version)
    if wanted is None or torchvision_version.startswith(wanted + "."):
        return None
    base = torch_version.partition("+")[0]
    what = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return UserError(
        f"torchvision {torchvision_version} is not the build for torch {torch_version} (that is torchvision {wanted}.x), "
        f"so importing it fails: {what}",
        hint=f'pip install "torch=={base}" "torchvision=={wanted}.*"{_index_url(torch_version)}',
    )


def _import(name: str) -> Any:
    """``importlib.import_module(name)``; a failure caused by a mismatched torchvision becomes one
    :class:`UserError` (any other failure is re-raised as it is)."""
    import importlib

    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError, OSError) as exc:
        error = mismatch_error(exc)
        if error is None:
            raise
        raise error from exc


def import_timm() -> Any:
    """``import timm``, with a mismatched torchvision reported as one :class:`UserError`."""
    return _import("timm")


def require_compatible_torchvision() -> None:
    """Import torchvision now (timm, torchmetrics and Lightning's image code import it later), so that
    a mismatch is said before anything is built. Nothing happens without torchvision."""
    if _version("torchvision") is not None:
        _import("torchvision")
