"""Face-recognition data: MXNet RecordIO sets, verification .bin files, demo data.

Submodules are imported on demand (``from facemargin.data.recordio import RecordIOReader``)
so that ``import facemargin.data`` stays cheap.
"""
