"""Where the bytes of a data set come from: local files, HTTP(S) and object storage (the bottom layer of ``data/``).

Every reader in :mod:`facemargin.data` reads through a
:class:`~facemargin.data.storage.source.ByteSource`:

* ``pread(n, offset)`` -- one positioned read (a record is read in one call: its length is known);
  remotely that is one ranged request, so map-style random access over the network works but
  pays one round trip per record;
* ``pread_many(reads)`` -- several ``(n, offset)`` reads at once (a window of a shuffled stream);
  remote sources issue them concurrently, so their round trips overlap instead of adding up;
* ``iter_range(start, end, block_bytes)`` -- sequential reads of ``[start, end)`` in blocks, for
  streaming; remote sources fetch the next blocks in a background thread while the caller
  decodes (read-ahead), so a stream runs at network bandwidth, not at request latency;
* ``size`` and ``name`` (the path or URL, used in every error message).

:func:`~facemargin.data.storage.source.open_source` picks the implementation from the path: a local path ->
:class:`~facemargin.data.storage.local.LocalSource`;
``http(s)://`` -> :class:`~facemargin.data.storage.http_source.HTTPSource` (standard library client, no extra
dependency); any other ``scheme://`` (``s3://``, ``gs://``, ...) ->
:class:`~facemargin.data.storage.fsspec_source.FsspecSource` (install ``facemargin[s3]`` / ``facemargin[gcs]``).
Remote reads retry transient failures (dropped connections, 5xx, short reads) with exponential
back-off and end in :class:`~facemargin.data.storage.remote.RemoteReadError` naming the URL and offset.
Every answer is checked against the version seen at open (size, ETag, Last-Modified, ...): a file
replaced while it is read raises :class:`~facemargin.data.storage.remote.RemoteFileChangedError`
instead of mixing two versions.

Small files (``.idx``, ``property``, ``.bin``) are used through
:func:`~facemargin.data.storage.cache.cached_copy`, which returns a
local path: the file itself when it is local, else a copy downloaded once into
``$FACEMARGIN_CACHE/remote`` (default ``~/.cache/facemargin/remote``) and fetched again when the
remote file changes (its ETag, Last-Modified or size differ).

Sources pickle without their open handles and re-open lazily in each process (DataLoader workers).

Modules: :mod:`~facemargin.data.storage.source` (the contract, ``open_source``, ``remote_options``),
:mod:`~facemargin.data.storage.local`, :mod:`~facemargin.data.storage.cache`,
:mod:`~facemargin.data.storage.remote` (what every remote source shares: retries, read-ahead),
:mod:`~facemargin.data.storage.http_source`, :mod:`~facemargin.data.storage.fsspec_source`.
Nothing is imported here: ``import facemargin.data.storage`` costs nothing.
"""
