"""Face detection with 5 landmarks: the contract (:mod:`.base`) and the landmark list files (:mod:`.landmarks`).

``python -m facemargin.detect IMAGES_DIR out=landmarks.txt`` writes the landmark list that
``pack --align`` and ``embed landmarks=`` read. Importing this package is cheap (numpy only).
"""

from .base import FACE_CHOICES, LANDMARK_NAMES, Detector, Face, select_face
from .landmarks import read_landmarks, write_landmarks

__all__ = ["FACE_CHOICES", "LANDMARK_NAMES", "Detector", "Face", "read_landmarks", "select_face", "write_landmarks"]
