"""BitLinear and the converter that swaps a built model's ``nn.Linear`` layers for it.

The quantization math lives in :mod:`bitnet_train.quant`; this file only wires it into a layer.
Backends:

* ``torch``  — the plain PyTorch reference (fake quantization + ``F.linear``), always available.
* ``triton`` — the Triton kernels of :mod:`bitnet_train.kernels` (int8 forward, STE backward).
* ``auto``   — the fastest measured: ``torch`` for now (the Triton kernels are correct but not yet
  faster on an H100, see docs/performance.md); ``triton`` on CUDA once ``AUTO_PREFERS_TRITON`` is set.

The backend is set per layer (``BitLinear.backend``, or :func:`set_backend` for a whole model)
and the environment variable ``BITNET_TRAIN_BACKEND`` overrides it for every layer.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant

BACKENDS = ("torch", "triton", "auto")
AUTO_PREFERS_TRITON = False  # flip when kernels/bench.py shows the Triton path ahead of torch
BACKEND_ENV = "BITNET_TRAIN_BACKEND"

# Modules never converted: embeddings and norms are not nn.Linear; the output head is.
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "output", "score", "classifier")


class BitLinearRMSNorm(nn.Module):
    """RMSNorm applied to a BitLinear's input (transformers' ``use_rms_norm`` option)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown BitLinear backend {name!r} ({where}); choose one of {', '.join(BACKENDS)}")
    return name


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that will actually run for a tensor on ``device``."""
    env = os.environ.get(BACKEND_ENV)
    name = _check_backend(env, f"${BACKEND_ENV}") if env else requested
    if name == "auto":
        # the best available: on an H100 (docs/performance.md) the Triton kernels are still slower than torch's
        # bf16 path, so `auto` runs the torch reference until a tuned kernel beats it
        return "triton" if AUTO_PREFERS_TRITON and device.type == "cuda" and triton_available() else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "BitLinear backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels "
            "in Triton's CPU interpreter); use backend 'torch' or 'auto' on the CPU"
        )
    return name


class BitLinear(nn.Linear):
    """A linear layer with absmean ternary weights and per-token absmax int8 activations.

    Parameters and state dict are those of ``nn.Linear`` (``weight``, optional ``bias``), holding
    the latent full-precision weights that the straight-through estimator trains. ``quant_lambda``
    in [0, 1] blends quantization in (0 = full precision, 1 = fully quantized).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        backend: str = "auto",
        quant_lambda: float = 1.0,
        use_rms_norm: bool = False,
        rms_norm_eps: float = 1e-6,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = _check_backend(backend, "BitLinear(backend=...)")
        self.quant_lambda = float(quant_lambda)
        self.rms_norm = BitLinearRMSNorm(in_features, rms_norm_eps) if use_rms_norm else None
        if self.rms_norm is not None and device is not None:
            self.rms_norm.to(device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "BitLinear":
        """A BitLinear holding ``linear``'s weights (copied as they are: same dtype and device)."""
        w = linear.weight
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        new.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        if new.rms_norm is not None:
            new.rms_norm = BitLinearRMSNorm(linear.in_features, new.rms_norm.variance_epsilon).to(
                device=w.device, dtype=w.dtype
            )
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        lam = self.quant_lambda
        if lam <= 0.0:
            return F.linear(x, self.weight, self.bias)
        backend = resolve_backend(self.backend, x.device)
        if backend == "triton" and lam >= 1.0:
            from .kernels import bitlinear_triton, matmul

            wq = self._quantized_weight()
            if (
                wq is not None
                and x.shape[-1] > 0
                and x.numel() // x.shape[-1] <= matmul.GEMV_MAX_M
                and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias)))
            ):
                # decoding without autograd: the GEMV kernel on 2-bit packed codes (cached with
                # the int8 ones); the same int32 products and rescale, so the same output bits
                return matmul.ternary_matmul(x, self._packed_weight(), wq[1], self.bias)
            return bitlinear_triton(x, self.weight, self.bias, wq)
        return quant.bitlinear_reference(x, self.weight, self.bias, lam)

    # Triton backend: the weight's ternary codes and scale are computed once per weight version
    # and reused by every forward until the weight changes, so gradient-accumulation micro-batches
    # (and activation-checkpointing recomputes) quantize it once per optimizer step. The key is
    # the parameter's identity, storage pointer, shape, dtype and autograd version counter: any
    # in-place update (optimizer step, load_state_dict, copy_) bumps the version, and .to() or
    # assigning .data changes the storage. Writes that bypass autograd's version counter (through
    # .data of an alias or raw storage) are not seen; call clear_weight_cache() after such writes.
    cache_quantized_weight = True

    def _quantized_weight(self):
        w = self.weight
        if not self.cache_quantized_weight or w.is_inference():
            return None
        # codes made under inference_mode are inference tensors, which autograd cannot save
        key = (id(w), w.data_ptr(), tuple(w.shape), w.dtype, w.device, w._version, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_wq_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        from .kernels import quantize_weight

        value = quantize_weight(w)
        self.__dict__["_wq_cache"] = (key, value)
        return value

    def _packed_weight(self):
        """2-bit packed codes of the current cached weight codes (built on first use)."""
        cached = self.__dict__["_wq_cache"]
        packed = self.__dict__.get("_wq_packed")
        if packed is None or packed[0] != cached[0]:
            from .kernels import pack_ternary

            packed = (cached[0], pack_ternary(cached[1][0]))
            self.__dict__["_wq_packed"] = packed
        return packed[1]

    def clear_weight_cache(self) -> None:
        """Drop the cached ternary codes of the Triton backend (they are rebuilt on demand)."""
        self.__dict__.pop("_wq_cache", None)
        self.__dict__.pop("_wq_packed", None)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", backend={self.backend}"
        if self.quant_lambda != 1.0:
            s += f", quant_lambda={self.quant_lambda:g}"
        return s


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if name == p or fnmatch.fnmatchcase(name, p) or name.endswith("." + p):
            return True
    return False


def convert_to_bitlinear(
    model: nn.Module,
    exclude: Iterable[str] | None = None,
    backend: str = "auto",
    quant_lambda: float = 1.0,
    use_rms_norm: bool = False,
    rms_norm_eps: float = 1e-6,
    default_exclude: bool = True,
    include: Iterable[str] | None = None,
) -> list[str]:
    """Swap every eligible ``nn.Linear`` of ``model`` (in place) for :class:`BitLinear`.

    Weights are copied; embeddings and norms are untouched (they are not ``nn.Linear``); the
    output head and any module whose qualified name matches an ``exclude`` pattern (exact name,
    a glob such as ``"*.gate"``, or a name suffix) stay full precision. Layers already BitLinear
    are left alone. ``default_exclude=False`` drops the built-in head patterns (a checkpoint's
    saved ``modules_to_not_convert`` list is then the whole truth). ``include`` (patterns as for
    ``exclude``) limits the conversion to the modules it names. Returns the converted names.

    An output head whose weight is tied to the input embedding stays a plain Linear (it shares
    the embedding's weight); naming it in ``include`` is an error. Raises ``ValueError`` naming
    the module when a layer cannot be converted: its weight is shared with another module that
    would be converted (the copy would break the tie), its weight is not floating point (an
    already-quantized layer), or it has no input or output features (there is nothing to
    quantize per token) — and when nothing at all can be converted.
    """
    patterns = (tuple(DEFAULT_EXCLUDE) if default_exclude else ()) + tuple(exclude or ())
    include = tuple(include) if include is not None else None
    _check_backend(backend, "convert_to_bitlinear(backend=...)")
    # an output head tied to the input embedding must stay a plain Linear (it shares its weight)
    tied_ids = set()
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        tied_ids.add(id(emb.weight))
    # which module names hold each parameter (several names = a tied weight)
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    chosen = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if include is not None and not _matches(name, include):
            continue
        if id(module.weight) in tied_ids:
            if include is not None:
                raise ValueError(
                    f"cannot convert module {name!r}: its weight is tied to the input embedding "
                    "(quantizing it would quantize the embedding too); leave it out of the include list"
                )
            continue
        if _matches(name, patterns):
            continue
        chosen.append((name, module))
    for name, module in chosen:
        shared = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"cannot convert module {name!r}: its weight is tied to {', '.join(sorted(shared))}; "
                "converting would copy it and break the tie (exclude these modules, or untie the weights)"
            )
        if not module.weight.is_floating_point():
            raise ValueError(
                f"cannot convert module {name!r}: its weight has dtype {module.weight.dtype}, not a floating-point "
                "type (an already-quantized layer holds no latent weights to train)"
            )
        if module.in_features <= 0 or module.out_features <= 0:
            raise ValueError(
                f"cannot convert module {name!r}: input width {module.in_features}, output width "
                f"{module.out_features} (per-token activation quantization needs at least one input feature)"
            )
    converted = []
    for name, module in chosen:
        new = BitLinear.from_linear(
            module, backend=backend, quant_lambda=quant_lambda, use_rms_norm=use_rms_norm, rms_norm_eps=rms_norm_eps
        )
        model.set_submodule(name, new)
        converted.append(name)
    if not converted:
        what = f"matching include patterns {', '.join(include)}" if include is not None else "eligible"
        raise ValueError(
            f"convert_to_bitlinear: no {what} nn.Linear found in {type(model).__name__} "
            f"(excluded patterns: {', '.join(patterns) or 'none'})"
        )
    return converted


def bitlinear_modules(model: nn.Module) -> list[tuple[str, BitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


def set_backend(model: nn.Module, backend: str) -> None:
    _check_backend(backend, "set_backend")
    for _, m in bitlinear_modules(model):
        m.backend = backend


def set_quant_lambda(model: nn.Module, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"quant_lambda must be in [0, 1], got {value}")
    for _, m in bitlinear_modules(model):
        m.quant_lambda = float(value)


def revert_to_linear(model: nn.Module) -> None:
    """Replace every BitLinear by a plain nn.Linear with the same latent weights (in place)."""
    for name, m in bitlinear_modules(model):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = m.weight
        lin.bias = m.bias
        model.set_submodule(name, lin)
