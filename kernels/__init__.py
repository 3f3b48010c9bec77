"""Triton kernels for BitNet (imported as ``bitnet_train.kernels``). See the kernels issue."""


def bitlinear_triton(x, weight, bias=None):
    raise NotImplementedError("the Triton BitLinear backend is not implemented yet")
