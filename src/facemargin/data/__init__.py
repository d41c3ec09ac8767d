"""Face-recognition data: RecordIO sets and image folders for training, demo data, the pack/inspect CLIs.

The folders are layers; a module imports only from its own layer or the ones below it:

1. :mod:`~facemargin.data.storage` -- where bytes come from: ``ByteSource`` (local files, HTTP(S),
   fsspec URLs), cached copies of small remote files.
2. :mod:`~facemargin.data.formats` -- RecordIO framing, the ``.idx`` and its cache, insightface /
   im2rec sets (``property``, meta record), ``.bin`` pair files, image decoding; ``SetFiles``: the
   files of one set, resolved once from ``data.root`` (local or remote) and handed down.
3. :mod:`~facemargin.data.sources` -- ``FaceSource``: a set as samples ``0 .. N-1``
   (``FaceRecordSet``, ``FolderSource``).
4. :mod:`~facemargin.data.loading` -- the epoch plan, the resumable loader, normalisation,
   augmentations, device decoding.
5. :mod:`~facemargin.data.module` (the Lightning DataModule) and :mod:`~facemargin.data.tools`
   (pack, inspect, the synthetic demo set; commands ``python -m facemargin.data.pack`` /
   ``python -m facemargin.data.inspect``).

Nothing in ``data/`` imports :mod:`facemargin.evaluation` or the LightningModule: the DataModule
names its verification files, the code above builds evaluators from them. Submodules are imported
on demand (``from facemargin.data.sources.recordio import FaceRecordSet``), so
``import facemargin.data`` costs nothing.
"""
