"""Factories for small random networks built from the layers the bound engine supports.

Every factory is deterministic given its ``seed`` and returns a module in eval
mode whose BatchNorm layers carry random running statistics and affine
parameters (some scales negative), so BatchNorm is never the identity and a
wrong sign or a swapped mean/variance in the engine shows up in the tests.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certdistill.bounds.layers import Add, ConstantAffine, GraphNetwork, Reshape

SUPPORTED_LAYERS = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.Flatten,
    nn.Unflatten,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.AvgPool2d,
    nn.Identity,
    nn.Dropout,
    nn.ZeroPad2d,
    ConstantAffine,
    Reshape,
    Add,
    GraphNetwork,
    nn.Sequential,
)


#: AvgPool2d configurations the random CNNs draw from (False: no pooling).
POOLS: list[bool | dict] = [
    False,
    True,
    {"kernel_size": 2, "stride": 1},
    {"kernel_size": 3, "stride": 1, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False},
    {"kernel_size": 2, "ceil_mode": True},
    {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 1)},
]


def randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm layer of ``module`` random running stats and affine parameters.

    Parameters
    ----------
    module : torch.nn.Module
        Network to modify in place.
    generator : torch.Generator
        Source of randomness.

    Returns
    -------
    torch.nn.Module
        ``module``, for chaining.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.3 + 1.7 * torch.rand(c, generator=generator))
                if m.affine:
                    sign = torch.where(torch.rand(c, generator=generator) < 0.2, -1.0, 1.0)
                    m.weight.copy_(sign * (0.5 + torch.rand(c, generator=generator)))
                    m.bias.copy_(0.3 * torch.randn(c, generator=generator))
    return module


def _finish(net: nn.Module, generator: torch.Generator, dtype: torch.dtype) -> nn.Module:
    randomize_batchnorm(net, generator)
    return net.to(dtype).eval()


def make_mlp(
    d_in: int,
    widths: Sequence[int],
    n_classes: int,
    *,
    seed: int = 0,
    batchnorm: bool = False,
    dropout: bool = False,
    identity: bool = False,
    nested: bool = False,
    weight_scale: float = 1.0,
    bn_affine: bool = True,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Random ReLU MLP ``Linear -> [BN] -> ReLU -> [Dropout] -> ... -> Linear``.

    Parameters
    ----------
    d_in : int
        Input dimension.
    widths : sequence of int
        Hidden widths; empty gives a single linear layer.
    n_classes : int
        Output dimension.
    seed : int, default=0
        Seed for weights and BatchNorm statistics.
    batchnorm, dropout, identity : bool, default=False
        Insert ``BatchNorm1d`` after each hidden Linear, ``Dropout`` after each
        ReLU, an ``Identity`` at the start.
    nested : bool, default=False
        Wrap each hidden block in its own ``nn.Sequential``.
    weight_scale : float, default=1.0
        Multiplier on the default initialisation; > 1 makes more neurons
        unstable for a given ``eps``.
    bn_affine : bool, default=True
        Whether BatchNorm layers have a learnable scale and shift.
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.

    Returns
    -------
    torch.nn.Sequential
        The network, in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Identity()] if identity else []
    prev = d_in
    for w in widths:
        block: list[nn.Module] = [nn.Linear(prev, w)]
        if batchnorm:
            block.append(nn.BatchNorm1d(w, affine=bn_affine))
        block.append(nn.ReLU())
        if dropout:
            block.append(nn.Dropout(0.3))
        layers.extend([nn.Sequential(*block)] if nested else block)
        prev = w
    layers.append(nn.Linear(prev, n_classes))
    net = nn.Sequential(*layers)
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(weight_scale)
    return _finish(net, gen, dtype)


def make_cnn(
    input_shape: tuple[int, int, int] = (2, 6, 6),
    channels: Sequence[int] = (3,),
    n_classes: int = 3,
    *,
    seed: int = 0,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int = 1,
    batchnorm: bool = True,
    avgpool: bool | dict = True,
    dropout: bool = False,
    hidden: int | None = 8,
    nested: bool = False,
    bn_affine: bool = True,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Random CNN ``[Conv-[BN2d]-ReLU]*k - [AvgPool] - Flatten - [Linear-ReLU] - Linear``.

    Parameters
    ----------
    input_shape : tuple of int, default=(2, 6, 6)
        ``(C, H, W)`` of one sample.
    channels : sequence of int, default=(3,)
        Output channels of each convolution.
    n_classes : int, default=3
        Number of logits.
    seed : int, default=0
        Seed for weights and BatchNorm statistics.
    kernel_size, stride, padding : int
        Hyper-parameters shared by all convolutions.
    batchnorm, dropout : bool
        Insert ``BatchNorm2d`` after each conv, ``Dropout`` before the last Linear.
    avgpool : bool or dict, default=True
        Insert one ``AvgPool2d`` before flattening: ``AvgPool2d(2)`` for True,
        ``AvgPool2d(**avgpool)`` for a dict (skipped if the map is too small).
    hidden : int or None, default=8
        Width of a hidden Linear layer after flattening; None for none.
    nested : bool, default=False
        Wrap each conv block in its own ``nn.Sequential``.
    bn_affine : bool, default=True
        Whether BatchNorm layers have a learnable scale and shift.
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.

    Returns
    -------
    torch.nn.Sequential
        The network, in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in channels:
        if min(h, w) + 2 * padding < kernel_size:
            break  # the map is already too small for another convolution
        block: list[nn.Module] = [nn.Conv2d(c, out, kernel_size, stride=stride, padding=padding)]
        if batchnorm:
            block.append(nn.BatchNorm2d(out, affine=bn_affine))
        block.append(nn.ReLU())
        layers.extend([nn.Sequential(*block)] if nested else block)
        c = out
        h = (h + 2 * padding - kernel_size) // stride + 1
        w = (w + 2 * padding - kernel_size) // stride + 1
    if avgpool:
        pool = nn.AvgPool2d(**(avgpool if isinstance(avgpool, dict) else {"kernel_size": 2}))
        try:
            pool(torch.zeros(1, c, h, w))
            layers.append(pool)
        except RuntimeError:
            pass  # output would be empty: leave the pooling out
    layers.append(nn.Flatten())
    with torch.no_grad():
        prev = nn.Sequential(*layers).eval()(torch.zeros(1, *input_shape)).shape[1]
    if hidden:
        layers += [nn.Linear(prev, hidden), nn.ReLU()]
        prev = hidden
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(prev, n_classes))
    return _finish(nn.Sequential(*layers), gen, dtype)


def make_unflatten_net(
    d_in: int,
    map_shape: tuple[int, int, int],
    channels: int,
    n_classes: int,
    *,
    seed: int = 0,
    kernel_size: int = 2,
    batchnorm: bool = True,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Random ``Linear - ReLU - Unflatten - Conv - [BN2d] - ReLU - Flatten - Linear``: flat
    features mapped to a feature map and convolved (the one factory that uses ``Unflatten``).

    Parameters
    ----------
    d_in : int
        Number of input features.
    map_shape : tuple of int
        ``(C, H, W)`` of the feature map the first layer's output is unflattened to.
    channels : int
        Output channels of the convolution.
    n_classes : int
        Number of logits.
    seed : int, default=0
        Seed for weights and BatchNorm statistics.
    kernel_size : int, default=2
        Kernel of the convolution (stride 1, no padding); at most ``min(H, W)``.
    batchnorm : bool, default=True
        Insert a ``BatchNorm2d`` after the convolution.
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.

    Returns
    -------
    torch.nn.Sequential
        The network, in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c, h, w = map_shape
    kernel = min(kernel_size, h, w)
    layers: list[nn.Module] = [
        nn.Linear(d_in, c * h * w),
        nn.ReLU(),
        nn.Unflatten(1, map_shape),
        nn.Conv2d(c, channels, kernel),
    ]
    if batchnorm:
        layers.append(nn.BatchNorm2d(channels))
    out = channels * (h - kernel + 1) * (w - kernel + 1)
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(out, n_classes)]
    return _finish(nn.Sequential(*layers), gen, dtype)


def make_linear_net(
    kind: str = "mlp", *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A network without any ReLU: its margins are affine, so every relaxation should be exact.

    Parameters
    ----------
    kind : {"single", "mlp", "cnn"}
        ``"single"``: one Linear layer; ``"mlp"``: Linear-BN-Dropout-Linear;
        ``"cnn"``: Conv-BN-AvgPool-Flatten-Linear.
    seed : int, default=0
        Seed.
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.

    Returns
    -------
    net : torch.nn.Sequential
        The network in eval mode.
    input_shape : tuple of int
        Shape of one sample.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "single":
        net, shape = nn.Sequential(nn.Linear(4, 3)), (4,)
    elif kind == "mlp":
        net = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Identity(), nn.Linear(6, 3)
        )
        shape = (4,)
    elif kind == "cnn":
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 3),
        )
        shape = (2, 4, 4)
    else:
        raise ValueError(kind)
    return _finish(net, gen, dtype), shape


def make_random_network(
    rng: np.random.Generator,
    *,
    kind: str | None = None,
    max_relus: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Sequential, tuple[int, ...], int]:
    """Draw a random architecture (MLP or CNN) from the supported layers.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the architecture choices and of the weight seed.
    kind : {"mlp", "cnn"} or None
        Force the family; None draws it.
    max_relus : int or None
        Keep drawing until the net has at most this many ReLU units (for MILP).
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.

    Returns
    -------
    net : torch.nn.Sequential
        The network in eval mode.
    input_shape : tuple of int
        Shape of one sample.
    n_classes : int
        Number of logits.
    """
    for _ in range(100):
        family = kind or ("mlp" if rng.random() < 0.5 else "cnn")
        seed = int(rng.integers(2**31))
        n_classes = int(rng.integers(2, 5))
        if family == "mlp":
            d_in = int(rng.integers(2, 6))
            widths = [int(w) for w in rng.integers(2, 9, size=int(rng.integers(0, 4)))]
            net = make_mlp(
                d_in,
                widths,
                n_classes,
                seed=seed,
                batchnorm=bool(rng.random() < 0.5),
                dropout=bool(rng.random() < 0.3),
                identity=bool(rng.random() < 0.3),
                nested=bool(rng.random() < 0.3),
                dtype=dtype,
            )
            shape: tuple[int, ...] = (d_in,)
        else:
            shape = (int(rng.integers(1, 3)), int(rng.integers(3, 6)), int(rng.integers(3, 6)))
            stride = int(rng.integers(1, 3))
            net = make_cnn(
                shape,
                [int(c) for c in rng.integers(1, 4, size=int(rng.integers(1, 3)))],
                n_classes,
                seed=seed,
                kernel_size=int(rng.integers(1, 4)),
                stride=stride,
                padding=int(rng.integers(0, 2)),
                batchnorm=bool(rng.random() < 0.7),
                avgpool=POOLS[int(rng.integers(len(POOLS)))],
                dropout=bool(rng.random() < 0.3),
                hidden=None if rng.random() < 0.5 else int(rng.integers(2, 7)),
                nested=bool(rng.random() < 0.3),
                dtype=dtype,
            )
        net, shape = _with_imported_layers(net, shape, family, seed, dtype)
        if max_relus is None or count_relus(net, shape) <= max_relus:
            return net, shape, n_classes
    raise RuntimeError("could not draw a small enough network")


def _with_imported_layers(
    net: nn.Sequential, shape: tuple[int, ...], family: str, seed: int, dtype: torch.dtype
) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Put the layers imported ONNX files bring in front of a random network: a constant
    normalisation (scalar, per channel or per feature, some scales negative), zero padding of
    feature maps, a reshape of odd input shapes such as ``(d, 1)``.

    Drawn from a generator of their own (seeded by ``seed``), so the architectures drawn before
    these layers existed are unchanged.
    """
    rng = np.random.default_rng(seed)
    front: list[nn.Module] = []
    if family == "cnn" and rng.random() < 0.3:
        left, right, top, bottom = (int(p) for p in rng.integers(0, 2, size=4))
        inner = (shape[0], shape[1] - top - bottom, shape[2] - left - right)
        if min(inner[1:]) >= 2:
            front.append(nn.ZeroPad2d((left, right, top, bottom)))
            shape = inner
    if rng.random() < 0.4:
        kind = rng.integers(3)
        constant_shape = [(), (shape[0],) + (1,) * (len(shape) - 1), shape][int(kind)]
        scale = rng.uniform(0.5, 2.0, size=constant_shape) * np.where(
            rng.random(constant_shape) < 0.2, -1.0, 1.0
        )
        shift = rng.normal(0.0, 0.5, size=constant_shape)
        front.insert(0, ConstantAffine(torch.tensor(scale), torch.tensor(shift)))
    if family == "mlp" and rng.random() < 0.3:
        front.insert(0, Reshape(shape))
        shape = (*shape, 1)
    if not front:
        return net, shape
    return nn.Sequential(*front, net).to(dtype).eval(), shape


def count_relus(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of scalar ReLU units a forward pass of one sample goes through."""
    total = 0

    def hook(_module, _inp, out):
        nonlocal total
        total += out[0].numel()

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.ReLU)]
    try:
        training = [(m, m.training) for m in net.modules()]
        net.eval()
        with torch.no_grad():
            dtype = next(net.parameters()).dtype
            net(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, t in training:
            m.training = t
    return total


def float64_copy(net: nn.Module) -> nn.Module:
    """Deep copy of ``net`` in float64 and eval mode, to evaluate true margins precisely."""
    return copy.deepcopy(net).double().eval()


def random_inputs(
    rng: np.random.Generator, n: int, input_shape: tuple[int, ...], *, unit: bool = False
) -> np.ndarray:
    """Random float32 inputs, in ``[0, 1]`` when ``unit`` else standard normal."""
    size = (n, *input_shape)
    x = rng.random(size) if unit else rng.standard_normal(size)
    return x.astype(np.float32)


def around(x: torch.Tensor, eps, lower=None, upper=None):
    """The validated perturbation of radius ``eps`` (and domain) around the samples of ``x``."""
    from certdistill.bounds import Perturbation

    return Perturbation.create(
        eps, x.shape[1:], lower=lower, upper=upper, dtype=x.dtype, device=x.device
    )


# ----------------------------------------------------------------------- residual networks
def make_residual_mlp(
    d_in: int,
    width: int,
    blocks: int,
    n_classes: int,
    *,
    seed: int = 0,
    batchnorm: bool = False,
    input_skip: bool = False,
    weight_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> GraphNetwork:
    """``h = relu(W x)``, then ``blocks`` times ``h = relu(h + W2 relu([BN] W1 h))``, then a
    classifier; with ``input_skip`` (needs ``d_in == width``) the first block also adds ``x``
    (a skip that crosses an activation from the input itself)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    inputs: list[tuple[int, ...]] = [(-1,), (0,)]
    for block in range(blocks):
        h = len(layers) - 1
        branch = [nn.Linear(width, width)]
        if batchnorm:
            branch.append(nn.BatchNorm1d(width))
        branch += [nn.ReLU(), nn.Linear(width, width)]
        layers.append(nn.Sequential(*branch))
        inputs.append((h,))
        layers.append(Add())
        inputs.append((len(layers) - 2, h))
        if input_skip and block == 0:
            layers.append(Add())
            inputs.append((len(layers) - 2, -1))
        layers.append(nn.ReLU())
        inputs.append((len(layers) - 2,))
    layers.append(nn.Linear(width, n_classes))
    inputs.append((len(layers) - 2,))
    net = GraphNetwork(layers, inputs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(weight_scale)
    return _finish(net, generator, dtype)


def make_residual_cnn(
    input_shape: tuple[int, int, int],
    channels: int,
    n_classes: int,
    *,
    seed: int = 0,
    batchnorm: bool = True,
    downsample: bool = False,
    dtype: torch.dtype = torch.float32,
) -> GraphNetwork:
    """``conv -> relu``, one residual block of two 3x3 convolutions (with ``downsample``: stride 2
    on the main path and a strided 1x1 convolution on the skip), ``relu``, average pooling,
    flatten, linear."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c, h, w = input_shape
    stride = 2 if downsample else 1
    main = [nn.Conv2d(channels, channels, 3, stride=stride, padding=1)]
    if batchnorm:
        main.append(nn.BatchNorm2d(channels))
    main += [nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)]
    layers = [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(), nn.Sequential(*main)]
    inputs = [(-1,), (0,), (1,)]
    if downsample:
        layers.append(nn.Conv2d(channels, channels, 1, stride=2))
        inputs.append((1,))
        skip = 3
    else:
        skip = 1
    layers.append(Add())
    inputs.append((2, skip))
    out_h, out_w = (h + 1) // stride if downsample else h, (w + 1) // stride if downsample else w
    layers += [
        nn.ReLU(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(channels * (out_h - 1) * (out_w - 1), n_classes),
    ]
    for _ in range(4):
        inputs.append((len(inputs) - 1,))
    return _finish(GraphNetwork(layers, inputs), generator, dtype)


class TracedResidualNet(nn.Module):
    """A plain module with a skip connection written as ``+`` (the torch.fx path), and its
    :class:`GraphNetwork` twin sharing the same layers (:meth:`as_graph`)."""

    def __init__(self, d_in: int = 5, width: int = 6, n_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(d_in, width)
        self.branch = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.branch(h))
        return self.head(torch.flatten(h, 1))

    def as_graph(self) -> GraphNetwork:
        return GraphNetwork(
            [self.stem, nn.ReLU(), self.branch, Add(), nn.ReLU(), nn.Flatten(), self.head],
            [(-1,), (0,), (1,), (1, 2), (3,), (4,), (5,)],
        ).eval()


def make_random_residual_network(
    rng: np.random.Generator,
    *,
    max_relus: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[GraphNetwork, tuple[int, ...], int]:
    """Draw a random residual MLP or CNN (see :func:`make_random_network`)."""
    for _ in range(100):
        seed = int(rng.integers(2**31))
        n_classes = int(rng.integers(2, 5))
        if rng.random() < 0.6:
            width = int(rng.integers(2, 7))
            input_skip = bool(rng.random() < 0.4)
            d_in = width if input_skip else int(rng.integers(2, 6))
            net = make_residual_mlp(
                d_in,
                width,
                int(rng.integers(1, 3)),
                n_classes,
                seed=seed,
                batchnorm=bool(rng.random() < 0.5),
                input_skip=input_skip,
                weight_scale=float(rng.uniform(0.8, 1.6)),
                dtype=dtype,
            )
            shape: tuple[int, ...] = (d_in,)
        else:
            shape = (int(rng.integers(1, 3)), int(rng.integers(3, 6)), int(rng.integers(3, 6)))
            net = make_residual_cnn(
                shape,
                int(rng.integers(1, 3)),
                n_classes,
                seed=seed,
                batchnorm=bool(rng.random() < 0.6),
                downsample=bool(rng.random() < 0.4),
                dtype=dtype,
            )
        if max_relus is None or count_relus(net, shape) <= max_relus:
            return net, shape, n_classes
    raise RuntimeError("could not draw a small enough residual network")
