"""Face-recognition data: RecordIO sets and image folders for training, demo data, the pack/inspect CLIs.

Formats: :mod:`~facemargin.data.index` (``.idx``), :mod:`~facemargin.data.recordio` (``.rec``),
:mod:`~facemargin.data.faceset` (insightface / im2rec sets), :mod:`~facemargin.data.decode`.
Sources: :mod:`~facemargin.data.sources` (``FaceSource``, image folders). Training:
:mod:`~facemargin.data.plan` (the epoch plan), :mod:`~facemargin.data.loader` (the resumable
loader), :mod:`~facemargin.data.module` (the Lightning DataModule). Bytes come through
:mod:`~facemargin.data.storage`.

Submodules are imported on demand (``from facemargin.data.faceset import FaceRecordSet``), so
``import facemargin.data`` costs nothing.
"""
