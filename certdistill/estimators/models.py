"""Default network builders and the IBP initialisation of Shi et al. (2021).

The builders only use layers that the native bound engine supports (``Linear``, ``Conv2d``,
``ReLU``, ``Flatten``, ``BatchNorm1d/2d``), so every default network can be trained with IBP,
CROWN-IBP or MTL-IBP and certified with any method. Following Shi et al. (2021), "Fast Certified
Robust Training with Short Warmup", every affine layer except the last is followed by BatchNorm,
and the weights are drawn with the IBP initialisation, which keeps the width of interval bounds
roughly constant from layer to layer at initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ibp_init_", "make_cnn", "make_mlp"]


def ibp_init_(module: nn.Module) -> nn.Module:
    """Apply the IBP initialisation of Shi et al. (2021) in place.

    Every ``Linear`` and ``Conv2d`` weight is drawn from ``N(0, sigma^2)`` with
    ``sigma = sqrt(2 pi) / fan_in`` (``fan_in`` is the number of inputs of one output unit), and
    every bias is set to zero. BatchNorm layers get unit scale and zero shift. The expected interval
    radius of a layer's output then equals the radius of its input at initialisation, so bounds
    neither explode nor vanish with depth.

    Parameters
    ----------
    module : torch.nn.Module
        Network to initialise; its sub-modules are visited recursively.

    Returns
    -------
    torch.nn.Module
        ``module`` itself, for chaining.
    """
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0.0, math.sqrt(2.0 * math.pi) / fan_in)
                if layer.bias is not None:
                    layer.bias.zero_()
            elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d) and layer.affine:
                layer.weight.fill_(1.0)
                layer.bias.zero_()
    return module


#: Largest input side at which the default CNN's first convolution keeps the full resolution.
_FULL_RESOLUTION = 16


def _check_sizes(name: str, sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if any(s < 1 for s in sizes):
        raise ValueError(f"{name} must contain positive integers, got {sizes!r}")
    return sizes


def make_mlp(
    n_features: int,
    n_classes: int,
    hidden_sizes: Sequence[int] = (512, 512),
    *,
    batch_norm: bool = True,
    init: str | None = "ibp",
) -> nn.Sequential:
    """Build a fully connected ReLU network for flat features.

    Parameters
    ----------
    n_features : int
        Number of input features.
    n_classes : int
        Number of outputs (logits).
    hidden_sizes : sequence of int, default=(512, 512)
        Width of each hidden layer.
    batch_norm : bool, default=True
        Put a ``BatchNorm1d`` after every hidden ``Linear`` layer.
    init : {"ibp", None}, default="ibp"
        ``"ibp"`` applies :func:`ibp_init_`; ``None`` keeps PyTorch's default initialisation.

    Returns
    -------
    torch.nn.Sequential
        ``Linear [-> BatchNorm1d] -> ReLU`` blocks followed by a final ``Linear``.
    """
    hidden_sizes = _check_sizes("hidden_sizes", hidden_sizes)
    layers: list[nn.Module] = []
    width = int(n_features)
    for h in hidden_sizes:
        layers.append(nn.Linear(width, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        width = h
    layers.append(nn.Linear(width, int(n_classes)))
    return _initialise(nn.Sequential(*layers), init)


def make_cnn(
    input_shape: Sequence[int],
    n_classes: int,
    channels: Sequence[int] = (32, 64),
    hidden_sizes: Sequence[int] = (256,),
    *,
    batch_norm: bool = True,
    init: str | None = "ibp",
) -> nn.Sequential:
    """Build a small convolutional ReLU network for images.

    On inputs of at most 16 pixels a side the first convolution has a 3x3 kernel, stride 1 and
    padding 1; every other one (the first too on larger inputs, where a full-resolution layer
    would dominate the cost of certified training) has a 4x4 kernel, stride 2 and padding 1
    (halving the resolution). While the resolution after the last
    convolution is still larger than 8, further stride-2 convolutions with the last channel count
    are appended. Fully connected layers of ``hidden_sizes`` follow, then the output layer. With the
    defaults and ``input_shape=(1, 8, 8)`` this is the network ``conv 32, conv 64 stride 2,
    fc 256`` that trains well with IBP on the digits data.

    Parameters
    ----------
    input_shape : sequence of int
        ``(channels, height, width)`` of one sample.
    n_classes : int
        Number of outputs (logits).
    channels : sequence of int, default=(32, 64)
        Output channels of each convolution.
    hidden_sizes : sequence of int, default=(256,)
        Width of each fully connected hidden layer.
    batch_norm : bool, default=True
        Put a BatchNorm after every convolution and hidden ``Linear`` layer.
    init : {"ibp", None}, default="ibp"
        ``"ibp"`` applies :func:`ibp_init_`; ``None`` keeps PyTorch's default initialisation.

    Returns
    -------
    torch.nn.Sequential
        The network; it expects inputs of shape ``(n, *input_shape)``.
    """
    input_shape = _check_sizes("input_shape", input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"make_cnn needs input_shape=(channels, height, width), got {input_shape!r}"
        )
    channels = _check_sizes("channels", channels)
    hidden_sizes = _check_sizes("hidden_sizes", hidden_sizes)
    if not channels:
        raise ValueError("make_cnn needs at least one convolution (channels is empty)")
    c, h, w = input_shape
    layers: list[nn.Module] = []

    def conv_block(c_in: int, c_out: int, first: bool) -> None:
        nonlocal h, w
        if first and max(h, w) <= _FULL_RESOLUTION:
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=1, padding=1))
        else:
            layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
            h, w = h // 2, w // 2
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU())

    for i, c_out in enumerate(channels):
        if i > 0 and min(h, w) < 2:
            raise ValueError(f"input_shape {input_shape!r} is too small for {len(channels)} convs")
        conv_block(c, c_out, first=i == 0)
        c = c_out
    while max(h, w) > 8 and min(h, w) >= 2:
        conv_block(c, c, first=False)
    layers.append(nn.Flatten())
    width = c * h * w
    for hidden in hidden_sizes:
        layers.append(nn.Linear(width, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        width = hidden
    layers.append(nn.Linear(width, int(n_classes)))
    return _initialise(nn.Sequential(*layers), init)


def _initialise(net: nn.Sequential, init: str | None) -> nn.Sequential:
    if init == "ibp":
        return ibp_init_(net)
    if init is None or init == "default":
        return net
    raise ValueError(f"init must be 'ibp' or None, got {init!r}")
