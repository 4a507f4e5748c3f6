"""Networks as graphs of bound operations: what the engine walks.

:func:`build_graph` turns a module into a :class:`BoundGraph`, its bound operations in
topological order with the nodes each one reads:

* an ``nn.Sequential`` (nested ones flattened) is the chain case, node ``i`` reading ``i - 1``;
* a :class:`~certdistill.bounds.layers.GraphNetwork` (what :func:`~certdistill.load_onnx`
  returns for residual files) gives its own edges, nested ``Sequential`` layers expanded;
* any other module is traced with ``torch.fx``: its submodules become operations through the
  registry of :mod:`certdistill.bounds.ops`, ``x + y`` of two branches an ``Add``, and
  ``relu`` and ``flatten`` calls their layers. Anything else is refused with the node named.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from certdistill.bounds.layers import Add, GraphNetwork
from certdistill.bounds.ops import BoundOp, op_for, supported_layers_text
from certdistill.exceptions import UnsupportedLayerError

__all__ = ["BoundGraph", "build_graph"]

#: The network's input, as a node index.
INPUT = -1


@dataclass
class BoundGraph:
    """Bound operations in topological order and the nodes each reads (``-1``: the input).

    Attributes
    ----------
    ops : list of BoundOp
    inputs : list of tuple of int
    names : list of str
        Where each operation comes from in the module (for messages).
    """

    ops: list[BoundOp]
    inputs: list[tuple[int, ...]]
    names: list[str] = field(default_factory=list)

    @property
    def is_chain(self) -> bool:
        return all(node == (i - 1,) for i, node in enumerate(self.inputs))

    def add(self, op: BoundOp, inputs: tuple[int, ...], name: str) -> int:
        if len(inputs) != op.arity:
            raise UnsupportedLayerError(
                f"Layer '{name}' ({op.layer!r}) takes {op.arity} inputs, it is given "
                f"{len(inputs)}: {'use a GraphNetwork or a traced module' if op.arity > 1 else ''}"
                f". {supported_layers_text()}"
            )
        self.ops.append(op)
        self.inputs.append(tuple(inputs))
        self.names.append(name)
        return len(self.ops) - 1

    def add_layer(self, layer: nn.Module, inputs: tuple[int, ...], name: str) -> int:
        """Add ``layer`` (a nested ``Sequential`` as its chain); return its output node."""
        if type(layer) is nn.Sequential:
            node = inputs
            last = None
            for child_name, child in layer.named_children():
                last = self.add_layer(child, node, f"{name}.{child_name}" if name else child_name)
                node = (last,)
            if last is None:
                if len(inputs) != 1:
                    raise UnsupportedLayerError(f"Empty Sequential '{name}' with two inputs.")
                return inputs[0]
            return last
        if type(layer) is GraphNetwork:
            if len(inputs) != 1:
                raise UnsupportedLayerError(f"GraphNetwork '{name}' takes one input.")
            outputs: list[int] = []
            for k, (child, reads) in enumerate(zip(layer.layers, layer.inputs, strict=True)):
                mapped = tuple(inputs[0] if j < 0 else outputs[j] for j in reads)
                outputs.append(
                    self.add_layer(child, mapped, f"{name}.layers.{k}" if name else f"layers.{k}")
                )
            return outputs[-1]
        return self.add(
            op_for(layer, name or type(layer).__name__), inputs, name or type(layer).__name__
        )


def build_graph(module: nn.Module) -> BoundGraph:
    """The graph of bound operations of ``module``.

    Parameters
    ----------
    module : torch.nn.Module
        An ``nn.Sequential``, a :class:`~certdistill.bounds.layers.GraphNetwork`, a supported
        layer, or a ``torch.fx``-traceable module built of them.

    Returns
    -------
    BoundGraph

    Raises
    ------
    UnsupportedLayerError
        For a layer, a function or a graph shape the engine cannot bound (the message names it).
    """
    graph = BoundGraph([], [], [])
    if type(module) in (nn.Sequential, GraphNetwork) or _registered(module):
        graph.add_layer(module, (INPUT,), "")
    else:
        _trace_into(graph, module)
    if not graph.ops:
        raise UnsupportedLayerError("The module has no layers to propagate bounds through.")
    _check_output_is_last(graph)
    return graph


def _registered(module: nn.Module) -> bool:
    from certdistill.bounds.ops import OP_REGISTRY

    return type(module) in OP_REGISTRY


def _check_output_is_last(graph: BoundGraph) -> None:
    read = {j for node in graph.inputs for j in node}
    dangling = [graph.names[i] for i in range(len(graph.ops) - 1) if i not in read]
    if dangling:
        raise UnsupportedLayerError(
            f"Layer(s) {', '.join(map(repr, dangling))} compute outputs that nothing reads: "
            "the network must end in one output."
        )


#: ``torch.fx`` call targets that are layers of their own.
_FUNCTIONS = {
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    "relu": nn.ReLU,
}
_ADDITIONS = (operator.add, torch.add, "add", operator.iadd)


def _symbolic_trace(module: nn.Module) -> torch.fx.GraphModule:
    """``module`` traced by ``torch.fx``, or an UnsupportedLayerError saying why not."""
    import torch.fx

    try:
        return torch.fx.symbolic_trace(module)
    except Exception as error:  # fx raises many kinds for untraceable Python
        raise UnsupportedLayerError(
            f"{type(module).__name__} is neither an nn.Sequential of supported layers nor a "
            f"torch.fx-traceable module ({type(error).__name__}: {error}). "
            f"{supported_layers_text()}"
        ) from None


def _trace_into(graph: BoundGraph, module: nn.Module) -> None:
    import torch.fx

    traced = _symbolic_trace(module)
    nodes: dict[str, int] = {}
    modules = dict(traced.named_modules())
    output = None
    for fx_node in traced.graph.nodes:
        where = f"{type(module).__name__}: {fx_node.op} {fx_node.target!r} (node {fx_node.name!r})"
        if fx_node.op == "placeholder":
            if nodes:
                raise UnsupportedLayerError(f"{where}: the module takes more than one input.")
            nodes[fx_node.name] = INPUT
            continue
        if fx_node.op == "output":
            output = fx_node.args[0]
            break
        computed = [a for a in fx_node.args if isinstance(a, torch.fx.Node)]
        inputs = tuple(nodes[a.name] for a in computed)
        if fx_node.op == "call_module":
            layer = modules[fx_node.target]
            if len(computed) != len(fx_node.args) or fx_node.kwargs:
                raise UnsupportedLayerError(f"{where}: extra arguments are not supported.")
            nodes[fx_node.name] = graph.add_layer(layer, inputs, str(fx_node.target))
        elif fx_node.op in ("call_function", "call_method") and fx_node.target in _ADDITIONS:
            if len(computed) != 2 or len(fx_node.args) != 2 or fx_node.kwargs:
                raise UnsupportedLayerError(
                    f"{where}: only the sum of two computed tensors is supported (for a "
                    "constant shift use a layer, e.g. certdistill.bounds.layers."
                    "ConstantAffine)."
                )
            nodes[fx_node.name] = graph.add_layer(Add(), inputs, fx_node.name)
        elif fx_node.op in ("call_function", "call_method") and fx_node.target in _FUNCTIONS:
            if len(fx_node.args) != 1 or any(k != "inplace" for k in fx_node.kwargs):
                raise UnsupportedLayerError(f"{where}: unexpected arguments.")
            nodes[fx_node.name] = graph.add_layer(
                _FUNCTIONS[fx_node.target](), inputs, fx_node.name
            )
        elif fx_node.op in ("call_function", "call_method") and fx_node.target in (
            torch.flatten,
            "flatten",
        ):
            start = (
                fx_node.args[1]
                if len(fx_node.args) > 1
                else fx_node.kwargs.get("start_dim", 0 if fx_node.op == "call_function" else 0)
            )
            end = fx_node.args[2] if len(fx_node.args) > 2 else fx_node.kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                raise UnsupportedLayerError(f"{where}: only flatten(x, 1) is supported.")
            nodes[fx_node.name] = graph.add_layer(nn.Flatten(), inputs[:1], fx_node.name)
        else:
            raise UnsupportedLayerError(
                f"{where} is not supported by the native bound engine. {supported_layers_text()}"
            )
    if not isinstance(output, torch.fx.Node) or nodes.get(output.name) != len(graph.ops) - 1:
        raise UnsupportedLayerError(
            f"{type(module).__name__}: the output must be the last computed tensor (one "
            "tensor, not a tuple, nor the input itself)."
        )
