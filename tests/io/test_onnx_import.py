"""ONNX import: every supported op computes what onnxruntime computes, and is bounded soundly.

Each case is a small graph written with ``onnx.helper``; the loaded module and onnxruntime run
the same random inputs. The loaded modules are then certified by every bound method and checked
against sampled points (the soundness witnesses of the engine's own tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from witnesses import assert_below, sampled_min_margins

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from certdistill import UnsupportedLayerError, certified_radius, certify, load_onnx  # noqa: E402
from certdistill.io.onnx_import import ONNX_OPS, OnnxImportError  # noqa: E402

RNG = np.random.default_rng(0)
METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]


def _const(name: str, array) -> onnx.TensorProto:
    array = np.asarray(array)
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    return numpy_helper.from_array(array, name)


def _weights(*shape) -> np.ndarray:
    return RNG.normal(0, 0.5, size=shape).astype(np.float32)


def _model(nodes, inits, in_shape, out_shape, *, opset=13, in_name="x", out_name="y"):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _save(model, tmp_path, name="net.onnx"):
    onnx.checker.check_model(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _mlp_tail(inp: str, width: int, n_out: int = 3):
    """Gemm -> Relu -> Gemm from ``inp`` (width features) to ``y``."""
    nodes = [
        helper.make_node("Gemm", [inp, "W1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "W2", "b2"], ["y"], transB=1),
    ]
    inits = [
        _const("W1", _weights(8, width)),
        _const("b1", _weights(8)),
        _const("W2", _weights(n_out, 8)),
        _const("b2", _weights(n_out)),
    ]
    return nodes, inits


def _conv_tail(inp: str, channels: int, size: int, n_out: int = 3):
    """Conv 3x3 -> Relu -> Flatten -> Gemm from a (1, channels, size, size) map to ``y``."""
    nodes = [
        helper.make_node("Conv", [inp, "K", "kb"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"]),
        helper.make_node("Flatten", ["cr"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "Wc", "bc"], ["y"], transB=1),
    ]
    inits = [
        _const("K", _weights(2, channels, 3, 3)),
        _const("kb", _weights(2)),
        _const("Wc", _weights(n_out, 2 * size * size)),
        _const("bc", _weights(n_out)),
    ]
    return nodes, inits


def _case_gemm_mnistfc_shape():
    # VNN-COMP mnistfc: input (1, 784, 1), Flatten, Gemm/Relu chain.
    nodes, inits = _mlp_tail("f", 12)
    return _model(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), *nodes], inits, [1, 12, 1], [1, 3]
    )


def _case_gemm_attributes():
    nodes = [
        helper.make_node("Gemm", ["x", "W", "c"], ["h"], alpha=0.5, beta=2.0, transB=0),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1),
    ]
    inits = [_const("W", _weights(5, 6)), _const("c", _weights(1, 6)), _const("W2", _weights(3, 6))]
    return _model(nodes, inits, [1, 5], [1, 3])


def _case_matmul_add_normalisation():
    # acasxu: Sub of a mean, Flatten, MatMul + Add chains; here with a Div as well.
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["s"]),
        helper.make_node("Div", ["s", "std"], ["n"]),
        helper.make_node("Flatten", ["n"], ["f"]),
        helper.make_node("MatMul", ["f", "W1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"]),
        helper.make_node("Add", ["b2", "m2"], ["y"]),
    ]
    inits = [
        _const("mean", _weights(1, 1, 1, 5)),
        _const("std", 0.5 + RNG.random(5)),
        _const("W1", _weights(5, 7)),
        _const("b1", _weights(7)),
        _const("W2", _weights(7, 4)),
        _const("b2", _weights(4)),
    ]
    return _model(nodes, inits, [1, 1, 1, 5], [1, 4], opset=8)


def _case_mul_and_reversed_sub():
    nodes = [
        helper.make_node("Mul", ["k", "x"], ["m"]),
        helper.make_node("Sub", ["c", "m"], ["s"]),
        *_mlp_tail("s", 6)[0],
    ]
    inits = [_const("k", _weights(6)), _const("c", np.float32(0.3)), *_mlp_tail("s", 6)[1]]
    return _model(nodes, inits, [1, 6], [1, 3])


def _case_conv_channel_normalisation_batchnorm():
    # cifar-style: per-channel Sub/Div, Conv, BatchNormalization, Relu, Flatten, Gemm.
    nodes = [
        helper.make_node("Sub", ["x", "mu"], ["s"]),
        helper.make_node("Div", ["s", "sigma"], ["n"]),
        helper.make_node(
            "Conv", ["n", "K0"], ["c0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("BatchNormalization", ["c0", "g", "be", "rm", "rv"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r"]),
        *_conv_tail("r", 3, 3)[0],
    ]
    inits = [
        _const("mu", _weights(1, 2, 1, 1)),
        _const("sigma", 0.5 + RNG.random((1, 2, 1, 1))),
        _const("K0", _weights(3, 2, 3, 3)),
        _const("g", _weights(3)),
        _const("be", _weights(3)),
        _const("rm", _weights(3)),
        _const("rv", 0.5 + RNG.random(3)),
        *_conv_tail("r", 3, 3)[1],
    ]
    return _model(nodes, inits, [1, 2, 6, 6], [1, 3])


def _case_conv_asymmetric_and_same_padding():
    nodes = [
        helper.make_node("Conv", ["x", "K0", "b0"], ["c0"], kernel_shape=[2, 3], pads=[0, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "K1"], ["c1"], kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f"]),
        helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1),
    ]
    inits = [
        _const("K0", _weights(2, 1, 2, 3)),
        _const("b0", _weights(2)),
        _const("K1", _weights(2, 2, 3, 3)),
        _const("W", _weights(3, 2 * 6 * 6)),
        _const("b", _weights(3)),
    ]
    return _model(nodes, inits, [1, 1, 6, 6], [1, 3])


def _case_pad_average_pool():
    # verivital: Conv, Relu, Pad, AveragePool, Flatten, Gemm.
    nodes = [
        helper.make_node("Conv", ["x", "K0", "b0"], ["c0"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Pad", ["r0", "pads"], ["p"], mode="constant"),
        helper.make_node("AveragePool", ["p"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "AveragePool",
            ["ap"],
            ["ap2"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            count_include_pad=0,
        ),
        helper.make_node("Flatten", ["ap2"], ["f"]),
        helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1),
    ]
    inits = [
        _const("K0", _weights(2, 1, 3, 3)),
        _const("b0", _weights(2)),
        _const("pads", np.array([0, 0, 1, 0, 0, 0, 1, 2], dtype=np.int64)),
        _const("W", _weights(3, 2 * 3 * 3)),
        _const("b", _weights(3)),
    ]
    return _model(nodes, inits, [1, 1, 7, 7], [1, 3])


def _case_reshape_family():
    # Reshape with 0 and -1, a target computed from Shape/Gather/Concat (torch exports),
    # Unsqueeze/Squeeze, a Transpose that moves a unit axis, Identity, Dropout, Cast, Constant.
    nodes = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Shape", ["i"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["i", "target"], ["flat"]),
        helper.make_node("Unsqueeze", ["flat", "axes2"], ["u"]),
        helper.make_node("Transpose", ["u"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Squeeze", ["t", "axes1"], ["sq"]),
        helper.make_node(
            "Constant",
            [],
            ["shape2"],
            value=_const("shape2v", np.array([0, 2, -1], dtype=np.int64)),
        ),
        helper.make_node("Reshape", ["sq", "shape2"], ["r2"]),
        helper.make_node("Dropout", ["r2"], ["d"]),
        helper.make_node("Cast", ["d"], ["cast"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["cast"], ["f"]),
        *_mlp_tail("f", 12)[0],
    ]
    inits = [
        _const("zero", np.array(0, dtype=np.int64)),
        _const("axes0", np.array([0], dtype=np.int64)),
        _const("axes1", np.array([1], dtype=np.int64)),
        _const("axes2", np.array([2], dtype=np.int64)),
        _const("minus_one", np.array([-1], dtype=np.int64)),
        *_mlp_tail("f", 12)[1],
    ]
    return _model(nodes, inits, [1, 3, 4], [1, 3])


def _case_vector_input():
    # VNN-COMP's test networks: a 1-D input, W @ x and x @ W.
    nodes = [
        helper.make_node("MatMul", ["W1", "x"], ["m"]),
        helper.make_node("Add", ["m", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    inits = [_const("W1", _weights(4, 3)), _const("b1", _weights(4)), _const("W2", _weights(4, 2))]
    return _model(nodes, inits, [3], [2], opset=14)


def _case_symbolic_batch_and_bias_free_conv():
    nodes = [
        helper.make_node("Conv", ["x", "K0"], ["c0"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["c0", "cb"], ["a"]),
        helper.make_node("Mul", ["a", "half"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        *_conv_tail("r", 2, 4)[0],
    ]
    inits = [
        _const("K0", _weights(2, 2, 1, 1)),
        _const("cb", _weights(1, 2, 1, 1)),
        _const("half", np.float32(0.5)),
        *_conv_tail("r", 2, 4)[1],
    ]
    return _model(nodes, inits, ["N", 2, 4, 4], ["N", 3])


def _case_residual_mlp():
    # h = relu(W1 x); y = W3 relu(h + W2 h - x) : an Add and a Sub of branches.
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["g1"], transB=1),
        helper.make_node("Relu", ["g1"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["g2"], transB=1),
        helper.make_node("Add", ["h", "g2"], ["s"]),
        helper.make_node("Sub", ["s", "x"], ["d"]),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Gemm", ["r", "W3", "b3"], ["y"], transB=1),
    ]
    inits = [
        _const("W1", _weights(6, 6)),
        _const("b1", _weights(6)),
        _const("W2", _weights(6, 6)),
        _const("b2", _weights(6)),
        _const("W3", _weights(3, 6)),
        _const("b3", _weights(3)),
    ]
    return _model(nodes, inits, [1, 6], [1, 3])


def _case_residual_cnn():
    # cifar10_resnet style: conv-relu, a block conv-bn-relu-conv added to its input, relu.
    nodes = [
        helper.make_node("Conv", ["x", "K0", "k0"], ["c0"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "K1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "rm", "rv"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", "K2", "k2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Add", ["c2", "r0"], ["a"]),
        helper.make_node("Relu", ["a"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1),
    ]
    inits = [
        _const("K0", _weights(2, 1, 3, 3)),
        _const("k0", _weights(2)),
        _const("K1", _weights(2, 2, 3, 3)),
        _const("g", _weights(2)),
        _const("be", _weights(2)),
        _const("rm", _weights(2)),
        _const("rv", 0.5 + RNG.random(2)),
        _const("K2", _weights(2, 2, 3, 3)),
        _const("k2", _weights(2)),
        _const("W", _weights(3, 2 * 5 * 5)),
        _const("b", _weights(3)),
    ]
    return _model(nodes, inits, [1, 1, 5, 5], [1, 3])


CASES = {
    "residual-mlp-add-sub": _case_residual_mlp,
    "residual-cnn": _case_residual_cnn,
    "gemm-mnistfc-shape": _case_gemm_mnistfc_shape,
    "gemm-attributes": _case_gemm_attributes,
    "matmul-add-normalisation": _case_matmul_add_normalisation,
    "mul-and-reversed-sub": _case_mul_and_reversed_sub,
    "conv-channel-normalisation-batchnorm": _case_conv_channel_normalisation_batchnorm,
    "conv-asymmetric-and-same-padding": _case_conv_asymmetric_and_same_padding,
    "pad-average-pool": _case_pad_average_pool,
    "reshape-family": _case_reshape_family,
    "vector-input": _case_vector_input,
    "symbolic-batch-bias-free-conv": _case_symbolic_batch_and_bias_free_conv,
}


def _run_ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.astype(np.float32)})[0]


@pytest.fixture(params=sorted(CASES))
def imported(request, tmp_path):
    path = _save(CASES[request.param](), tmp_path)
    return path, load_onnx(path)


def _file_input(model, path) -> tuple[int, ...]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)


def test_imported_network_computes_what_onnxruntime_computes(imported):
    path, module = imported
    file_shape = _file_input(module, path)
    for _ in range(3):
        x = RNG.uniform(-1, 1, size=file_shape).astype(np.float32)
        expected = _run_ort(path, x).reshape(1, -1)
        got = module(torch.from_numpy(x.reshape(1, *module.input_shape))).detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.ndim == 2


def test_every_supported_op_is_exercised():
    used = set()
    for make in CASES.values():
        used |= {node.op_type for node in make().graph.node}
    assert set(ONNX_OPS) <= used, set(ONNX_OPS) - used


@pytest.mark.parametrize("method", METHODS)
def test_imported_network_bounds_are_sound(imported, method):
    _, module = imported
    x = RNG.uniform(-1, 1, size=(3, *module.input_shape))
    cert = certify(module, x, 0.05, method=method)
    witness = sampled_min_margins(module, x, cert.prediction, 0.05)
    assert_below(cert.margins, witness, what=f"sampled margin ({method})")


def test_certify_and_certified_radius_accept_an_onnx_path(tmp_path):
    path = _save(_case_gemm_mnistfc_shape(), tmp_path)
    module = load_onnx(path)
    x = RNG.uniform(0, 1, size=(4, *module.input_shape))
    by_path = certify(str(path), x, 0.02, method="crown")
    by_module = certify(module, x, 0.02, method="crown")
    np.testing.assert_array_equal(by_path.margins, by_module.margins)
    np.testing.assert_array_equal(
        certified_radius(path, x, max_eps=0.2), certified_radius(module, x, max_eps=0.2)
    )


def test_complete_verification_of_an_imported_network(tmp_path):
    path = _save(_case_matmul_add_normalisation(), tmp_path)
    module = load_onnx(path)
    x = RNG.uniform(-1, 1, size=(6, *module.input_shape))
    cert = certify(module, x, 0.05, method="complete", timeout=5.0)
    assert (cert.status != "unknown").all()
    falsified = cert.status == "falsified"
    if falsified.any():  # every counterexample is real (onnxruntime disagrees with the label)
        points = cert.counterexample[falsified].astype(np.float32)
        logits = np.concatenate(
            [_run_ort(path, p.reshape(_file_input(module, path))) for p in points]
        ).reshape(falsified.sum(), -1)
        assert (logits.argmax(1) != cert.prediction[falsified]).all()


def test_residual_files_load_as_graph_networks(tmp_path):
    from certdistill.bounds.layers import GraphNetwork

    graph = load_onnx(_save(_case_residual_cnn(), tmp_path, "res.onnx"))
    chain = load_onnx(_save(_case_gemm_mnistfc_shape(), tmp_path, "chain.onnx"))
    assert isinstance(graph, GraphNetwork) and type(chain) is torch.nn.Sequential
    x = RNG.uniform(0, 1, size=(4, *graph.input_shape))
    cert = certify(graph, x, 0.05, method="complete", timeout=10)
    assert (cert.status != "unknown").all()


def test_loaded_module_attributes(tmp_path):
    path = _save(_case_gemm_mnistfc_shape(), tmp_path)
    module = load_onnx(path)
    assert module.input_shape == (12, 1)
    assert module.onnx_input == "x" and module.onnx_output == "y"
    assert not module.training
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert load_onnx(path, dtype=torch.float64)[1].weight.dtype == torch.float64


# ------------------------------------------------------------------------------ errors
def _error_cases():
    broadcast = _model(
        [
            helper.make_node("Gemm", ["x", "W"], ["h"], transB=1),
            helper.make_node("ReduceSum", ["h"], ["s"], keepdims=1),
            helper.make_node("Add", ["h", "x"], ["y"]),
        ],
        [_const("W", _weights(4, 4))],
        [1, 4],
        [1, 4],
    )
    product = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "x"], ["y"])],
        [],
        [1, 4],
        [1, 4],
    )
    shapes = _model(
        [
            helper.make_node("Gemm", ["x", "W"], ["h"], transB=1),
            helper.make_node("Add", ["h", "x"], ["y"]),
        ],
        [_const("W", _weights(3, 4))],
        [1, 4],
        [1, 3],
    )
    unsupported = _model(
        [helper.make_node("Sigmoid", ["x"], ["y"], name="act")], [], [1, 4], [1, 4]
    )
    permuting = _model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
            helper.make_node("Flatten", ["t"], ["y"]),
        ],
        [],
        [1, 2, 3],
        [1, 6],
    )
    square = _model([helper.make_node("Mul", ["x", "x"], ["y"])], [], [1, 4], [1, 4])
    grouped = _model(
        [
            helper.make_node("Conv", ["x", "K"], ["c"], kernel_shape=[1, 1], group=2),
            helper.make_node("Flatten", ["c"], ["y"]),
        ],
        [_const("K", _weights(2, 1, 1, 1))],
        [1, 2, 3, 3],
        [1, 18],
    )
    divide_by_x = _model(
        [helper.make_node("Div", ["one", "x"], ["y"])],
        [_const("one", np.float32(1))],
        [1, 4],
        [1, 4],
    )
    reflect = _model(
        [
            helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
            helper.make_node("Flatten", ["p"], ["y"]),
        ],
        [_const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))],
        [1, 1, 3, 3],
        [1, 25],
    )
    del broadcast
    return {
        "product-of-branches": (product, r"Mul of 2 computed tensors is not supported"),
        "branches-of-two-shapes": (shapes, r"Add node .*shapes \(1, 3\) and \(1, 4\)"),
        "unsupported-op": (
            unsupported,
            r"Sigmoid node 'act'.*op 'Sigmoid' is not supported\. "
            r"Supported ONNX ops: Gemm, MatMul",
        ),
        "permuting-transpose": (permuting, r"Transpose .*perm=\[0, 2, 1\].*permutes data"),
        "square": (square, r"Mul node .*same computed tensor twice"),
        "grouped-conv": (grouped, r"Conv node .*group=2"),
        "constant-over-x": (divide_by_x, r"Div node .*not linear"),
        "reflect-pad": (reflect, r"Pad node .*only zero padding"),
    }


@pytest.mark.parametrize("name", sorted(_error_cases()))
def test_unsupported_graphs_get_an_error_naming_the_node(name, tmp_path):
    model, pattern = _error_cases()[name]
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(OnnxImportError, match=pattern) as info:
        load_onnx(path)
    assert isinstance(info.value, UnsupportedLayerError)
    assert "bad.onnx" in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No ONNX file"):
        load_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        load_onnx(junk)
    path = _save(_case_gemm_mnistfc_shape(), tmp_path)
    with pytest.raises(ValueError, match="no graph output named 'z'"):
        load_onnx(path, output="z")


def test_certify_names_an_unsupported_module_before_running_it():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LSTM(8, 8))
    with pytest.raises(UnsupportedLayerError, match=r"Layer '1' \(LSTM\(8, 8\)\) is not supported"):
        certify(net, np.zeros((2, 4)), 0.1)


def test_certify_refuses_other_objects():
    with pytest.raises(TypeError, match="torch.nn.Module or the path of an .onnx file"):
        certify(42, np.zeros((2, 4)), 0.1)
