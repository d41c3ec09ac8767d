"""Face detection with 5 landmarks: the contract (:mod:`.base`), the landmark list files
(:mod:`.landmarks`), and the way from a photo to an aligned face (:mod:`.pipeline`).

Detectors: :mod:`.mtcnn` (offline default, weights from the facenet-pytorch wheel) and
:mod:`.scrfd` (insightface's, ONNX Runtime, weights fetched on first use), built by name with
:func:`load_detector`. ``python -m facemargin.detect IMAGES_DIR out=landmarks.txt`` writes the
landmark list that ``pack --align`` and ``embed landmarks=`` read. Importing this package is cheap
(numpy only); a detector imports its runtime when it is built.
"""

from .base import FACE_CHOICES, LANDMARK_NAMES, Detector, Face, select_face
from .landmarks import read_landmarks, write_landmarks
from .pipeline import FaceChoice, choose_face, detect_and_align, load_detector

__all__ = ["FACE_CHOICES", "LANDMARK_NAMES", "Detector", "Face", "FaceChoice", "choose_face", "detect_and_align",
           "load_detector", "read_landmarks", "select_face", "write_landmarks"]
