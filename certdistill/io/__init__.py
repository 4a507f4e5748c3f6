"""Formats in and out: ONNX import and export, VNN-LIB properties.

:mod:`certdistill.io.onnx_export` writes a fitted estimator (or an ``nn.Sequential`` of supported
layers) as an ONNX graph that computes the same logits and probabilities with any ONNX runtime;
:mod:`certdistill.io.onnx_import` reads an ONNX network back as an ``nn.Sequential`` the bound
engine can certify; :mod:`certdistill.io.vnnlib` parses VNN-LIB properties. ONNX needs the
optional ``onnx`` package (``pip install "certdistill[onnx]"``). The estimators' own safe format
lives with them, in :mod:`certdistill.estimators.persistence`.

May import: ``bounds``, ``exceptions``. It recognises estimators by their
``_certdistill_estimator`` tag, not by importing them.
"""
