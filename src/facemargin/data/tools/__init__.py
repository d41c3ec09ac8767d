"""Tools on top of the data layers: :mod:`~facemargin.data.tools.pack` (image folders -> RecordIO sets;
``--align`` in :mod:`~facemargin.data.tools.pack_align`, ``--detect`` in
:mod:`~facemargin.data.tools.pack_detect`, the set's files written by
:mod:`~facemargin.data.tools.faceset_writer`), :mod:`~facemargin.data.tools.inspect` (check a set),
:mod:`~facemargin.data.tools.synthetic` (the demo set).

The commands stay ``python -m facemargin.data.pack`` and ``python -m facemargin.data.inspect``.
"""
