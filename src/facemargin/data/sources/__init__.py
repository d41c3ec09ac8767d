"""Training sources: a face set seen as samples ``0 .. N-1`` (above :mod:`facemargin.data.formats`).

:mod:`~facemargin.data.sources.base` (the :class:`FaceSource` contract),
:mod:`~facemargin.data.sources.recordio` (``FaceRecordSet``: RecordIO sets, local or remote),
:mod:`~facemargin.data.sources.folder` (``FolderSource``: image folders and list files).
"""
