"""Certification at scale: thread settings of a call (``parallel``), dask arrays and
clusters (``distributed``, optional ``dask`` dependency) and the opt-in allocator setting that
keeps freed memory for the next training step (``allocator``).

May import: ``bounds``, ``verify``, ``certification``, ``exceptions``.
Imported by: ``estimators``, ``cli``.
"""
