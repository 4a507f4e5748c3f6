"""A network's architecture as JSON data, and back, for the supported layers only.

The safe file format (:mod:`certdistill.estimators.persistence`) stores a network as this
description plus
its tensors, so loading one builds layers from a fixed list of constructors and never runs code
from the file. Types match exactly, as in the bound engine: a subclass may override ``forward``,
so it is refused rather than rebuilt as its base class.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from certdistill.exceptions import SafeFormatError

__all__ = ["ARCHITECTURE_LAYERS", "describe_module", "build_module"]


def _pair_or_str(value):
    return value if isinstance(value, str) else list(value) if isinstance(value, tuple) else value


#: Layer type -> the constructor arguments that define it (read from attributes of the same name).
ARCHITECTURE_LAYERS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.Conv2d: (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "bias",
        "padding_mode",
    ),
    nn.ReLU: ("inplace",),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.Unflatten: ("dim", "unflattened_size"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.AvgPool2d: (
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    ),
    nn.Identity: (),
    nn.Dropout: ("p", "inplace"),
}

_BY_NAME = {layer.__name__: layer for layer in ARCHITECTURE_LAYERS}

#: Arguments stored as tuples by the layers (JSON gives lists back).
_TUPLE_ARGS = {"kernel_size", "stride", "padding", "dilation", "unflattened_size"}

_SUPPORTED_TEXT = (
    "The safe format stores Linear, Conv2d, ReLU, Flatten, Unflatten, BatchNorm1d, BatchNorm2d, "
    "AvgPool2d, Identity, Dropout and nested Sequential"
)


def _argument(layer: nn.Module, name: str):
    if name == "bias":  # a flag in the constructor, a tensor (or None) on the layer
        return layer.bias is not None
    value = getattr(layer, name)
    return _pair_or_str(value)


def describe_module(module: nn.Module, name: str = "module") -> dict:
    """JSON-representable description of a network of supported layers.

    Parameters
    ----------
    module : torch.nn.Module
        A supported layer or an ``nn.Sequential`` (nested at any depth) of them.
    name : str, default="module"
        Name of the network in error messages.

    Returns
    -------
    dict
        ``{"type": ..., "args": {...}, "training": bool}``; a Sequential has ``"children"``, a
        list of ``[name, description]`` pairs (names matter: they key the weights).

    Raises
    ------
    SafeFormatError
        If a layer is not one of the supported types (subclasses included).
    """
    kind = type(module)
    if kind is nn.Sequential:
        children = [
            [child_name, describe_module(child, f"{name}.{child_name}")]
            for child_name, child in module.named_children()
        ]
        return {"type": "Sequential", "children": children, "training": module.training}
    if kind not in ARCHITECTURE_LAYERS:
        raise SafeFormatError(
            f"Layer '{name}' ({module!r}, type {kind.__module__}.{kind.__qualname__}) cannot be "
            f"stored in the safe format. {_SUPPORTED_TEXT} (exact types, no subclasses). Save "
            "this model with joblib instead (it stores any code, but load joblib files only "
            "from sources you trust)."
        )
    args = {arg: _argument(module, arg) for arg in ARCHITECTURE_LAYERS[kind]}
    return {"type": kind.__name__, "args": args, "training": module.training}


def build_module(description: dict) -> nn.Module:
    """Build the (untrained) network a :func:`describe_module` description stands for.

    Parameters
    ----------
    description : dict

    Returns
    -------
    torch.nn.Module
        The network, each layer in the train/eval mode it was described in.

    Raises
    ------
    ValueError
        If the description names a layer outside the supported list or is malformed.
    """
    try:
        module = _build(description)
        _set_modes(module, description)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed architecture description: {error!r}") from None
    return module


def _build(description: dict) -> nn.Module:
    kind = description["type"]
    if kind == "Sequential":
        return nn.Sequential(
            OrderedDict(
                (str(child_name), _build(child)) for child_name, child in description["children"]
            )
        )
    if kind not in _BY_NAME:
        raise ValueError(f"unknown layer type {kind!r} in the architecture. {_SUPPORTED_TEXT}.")
    layer = _BY_NAME[kind]
    args = description["args"]
    unknown = set(args) - set(ARCHITECTURE_LAYERS[layer])
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)} for {kind} in the architecture")
    return layer(
        **{
            key: tuple(value) if key in _TUPLE_ARGS and isinstance(value, list) else value
            for key, value in args.items()
        }
    )


def _set_modes(module: nn.Module, description: dict) -> None:
    module.training = bool(description["training"])
    if description["type"] == "Sequential":
        for child, (_, child_description) in zip(
            module.children(), description["children"], strict=True
        ):
            _set_modes(child, child_description)
