"""File formats of face data, read and written without MXNet (above :mod:`facemargin.data.storage`).

:mod:`~facemargin.data.formats.recordio` (``.rec`` framing, record payloads, reader and writer),
:mod:`~facemargin.data.formats.index` (``.idx`` parsing and the memory-mapped index cache),
:mod:`~facemargin.data.formats.faceset` (insightface / im2rec sets: ``property``, meta record,
identity ranges), :mod:`~facemargin.data.formats.verification` (``.bin`` pair files, LFW
``pairs.txt``), :mod:`~facemargin.data.formats.image` (encoded images -> uint8 RGB, size checked
first), :mod:`~facemargin.data.formats.setfiles` (``SetFiles``: a set's files under its root, local
or remote, resolved once). Imports numpy (and simplejpeg / Pillow when decoding), never torch.
"""
