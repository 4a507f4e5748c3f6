"""The public certification API: :func:`~certdistill.certify` and
:func:`~certdistill.certified_radius` on any supported network.

``problem`` validates the inputs once and runs the cascade of bound methods (``bounds``) and
complete-verification stages (``verify``); ``certify`` is the in-memory entry point,
``streaming`` the chunked one for memory-mapped arrays and iterables of batches (``sparse_rows``
keeps their counterexamples small), ``vnncomp`` runs ONNX + VNN-LIB instances.

May import: ``bounds``, ``verify``, ``io`` (ONNX and VNN-LIB readers), ``exceptions``.
Imported by: ``scale``, ``estimators``, ``plotting``, ``cli`` and the package root.
"""
