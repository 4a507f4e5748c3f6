"""The backward step of ``Conv2d`` (a transposed convolution with output padding) is the exact
transpose of the layer: ``<A, conv(x)> == <conv^T(A), x>`` for every stride, padding and input
size, including sizes the stride does not divide (rows and columns the convolution never reads)."""

import pytest
import torch
from torch import nn

from certdistill.bounds.ops import Conv2dOp


@pytest.mark.parametrize("size", [(7, 7), (8, 9), (6, 5)])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", [0, 1, (2, 0)])
@pytest.mark.parametrize("kernel", [1, 3, (2, 4)])
def test_backward_is_the_transpose_of_the_convolution(size, stride, padding, kernel):
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding).double()
    x = torch.randn(4, 2, *size, dtype=torch.float64)
    try:
        out = layer(x)
    except RuntimeError:
        pytest.skip("kernel larger than the padded input")
    op = Conv2dOp(layer)
    A = torch.randn(4, 5, *out.shape[1:], dtype=torch.float64)
    A_in, bias = op.backward(A, x.shape[1:])
    assert A_in.shape == (4, 5, *x.shape[1:])
    # A . (W x + b) == A_in . x + bias, per sample and specification row
    direct = torch.einsum("nschw,nchw->ns", A, out)
    through = torch.einsum("nschw,nchw->ns", A_in, x) + bias
    torch.testing.assert_close(through, direct, rtol=1e-12, atol=1e-12)
    # and it equals autograd's gradient of the input
    reference = torch.nn.grad.conv2d_input(
        (20, *x.shape[1:]),
        layer.weight,
        A.reshape(20, *A.shape[2:]),
        stride=layer.stride,
        padding=op.padding,
    ).view_as(A_in)
    torch.testing.assert_close(A_in, reference, rtol=1e-12, atol=1e-12)
