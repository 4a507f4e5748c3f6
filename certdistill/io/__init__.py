"""Formats in and out: ONNX import and export.

:mod:`certdistill.io.onnx_export` writes a fitted estimator (or an ``nn.Sequential`` of supported
layers) as an ONNX graph that computes the same logits and probabilities with any ONNX runtime;
:mod:`certdistill.io.onnx_import` reads an ONNX network back as an ``nn.Sequential`` the bound
engine can certify. Both need the optional ``onnx`` package (``pip install "certdistill[onnx]"``).
"""
