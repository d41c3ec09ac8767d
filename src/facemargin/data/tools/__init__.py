"""Tools on top of the data layers: :mod:`~facemargin.data.tools.pack` (image folders -> RecordIO sets),
:mod:`~facemargin.data.tools.inspect` (check a set), :mod:`~facemargin.data.tools.synthetic` (the demo set).

The commands stay ``python -m facemargin.data.pack`` and ``python -m facemargin.data.inspect``.
"""
