"""Real photos that ship inside installed registry packages: for tests, benchmarks and a first try.

Located through :mod:`importlib.metadata` (the package is never imported) and decoded to RGB:

- ``astronaut``: Eileen Collins' NASA portrait (public domain), ``skimage/data/astronaut.png``
  in scikit-image (``pip install scikit-image``; facemargin's ``dev`` extra), 512x512, one face;
- ``grace_hopper``: Grace Hopper's US Navy portrait (public domain),
  ``matplotlib/mpl-data/sample_data/grace_hopper.jpg`` in matplotlib (a core dependency),
  512x600, one face with glasses;
- ``camera``: scikit-image's photographer with a camera, 512x512 grey, one face;
- ``coffee`` and ``rocket``: scikit-image photos with no face.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import UserError

__all__ = ["PACKAGED_PHOTOS", "packaged_photo", "packaged_photo_path"]

#: name -> (distribution, file inside it, what it shows)
PACKAGED_PHOTOS = {
    "astronaut": ("scikit-image", "skimage/data/astronaut.png", "Eileen Collins, NASA portrait: one face"),
    "grace_hopper": ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "Grace Hopper, US Navy portrait: one face"),
    "camera": ("scikit-image", "skimage/data/camera.png", "a photographer with a camera (grey): one face"),
    "coffee": ("scikit-image", "skimage/data/coffee.png", "a cup of coffee: no face"),
    "rocket": ("scikit-image", "skimage/data/rocket.jpg", "a rocket on its launch pad: no face"),
}


def packaged_photo_path(name: str) -> Path:
    """Where the installed package keeps the photo ``name`` (:data:`PACKAGED_PHOTOS`)."""
    if name not in PACKAGED_PHOTOS:
        raise UserError(f"unknown packaged photo {name!r}; known: {', '.join(PACKAGED_PHOTOS)}")
    dist_name, rel, _ = PACKAGED_PHOTOS[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise UserError(f"the photo {name!r} ships in {dist_name}, which is not installed",
                        hint=f"pip install {dist_name}") from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise UserError(f"{dist_name} {dist.version} has no {rel}")
    return path


def packaged_photo(name: str) -> np.ndarray:
    """The photo ``name`` as uint8 ``[H, W, 3]`` RGB."""
    from ..data.formats.image import decode_image

    return decode_image(packaged_photo_path(name).read_bytes())
