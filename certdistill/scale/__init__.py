"""Certification at scale: thread settings of a call (``parallel``) and dask arrays and
clusters (``distributed``, optional ``dask`` dependency).

May import: ``bounds``, ``verify``, ``certification``, ``exceptions``.
Imported by: ``estimators``, ``cli``.
"""
