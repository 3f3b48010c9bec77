"""BitLinear and the converter that swaps a built model's ``nn.Linear`` layers for it.

The quantization math lives in :mod:`bitnet_train.quant`; this file only wires it into a layer.
Backends:

* ``torch``  — the PyTorch reference, always available: one ``torch.autograd.Function``
  (``bitlinear_autograd._BitLinearFn``) that keeps for backward only the int8 activation codes with
  their per-token scales and the int8 ternary weight codes with their scale.
* ``triton`` — the Triton kernels of :mod:`bitnet_train.kernels` (int8 forward, STE backward).
* ``auto``   — the fastest measured: ``torch`` for now (the Triton kernels are correct but not yet
  faster on an H100, see docs/performance.md); ``triton`` on CUDA once ``AUTO_PREFERS_TRITON`` is set.

The backend is set per layer (``BitLinear.backend``, or :func:`set_backend` for a whole model);
the environment variable ``BITNET_TRAIN_BACKEND`` overrides it for every layer. Both are read
when the backend is resolved — once per layer and device type, at its first forward after
construction, ``set_backend``, an assignment to ``.backend`` or a move (``.to``) — not per forward.

What the ``torch`` backend computes, and why: :mod:`bitnet_train.bitlinear_autograd`.
Shared activation codes (q/k/v, gate/up; both backends), the weight codes' lifetime and the
``quant_lambda`` buffer: the same module.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant
from .bitlinear_autograd import BitLinearRMSNorm, WeightCodeCache, _BitLinearFn, _SharedActQuant

BACKENDS = ("torch", "triton", "auto")
AUTO_PREFERS_TRITON = False  # flip when bitnet_train.kernels.bench shows the Triton path ahead of torch
BACKEND_ENV = "BITNET_TRAIN_BACKEND"

# Modules never converted: embeddings and norms are not nn.Linear; the output head is.
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "output", "score", "classifier")

# sibling projections that read the same input tensor (transformers' Llama-family attention and MLP)
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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


class BitLinear(WeightCodeCache, nn.Linear):
    """A linear layer with absmean ternary weights and per-token absmax int8 activations.

    Parameters and state dict are those of ``nn.Linear`` (``weight``, optional ``bias``), holding
    the latent full-precision weights that the straight-through estimator trains. ``quant_lambda``
    in [0, 1] blends quantization in (0 = full precision, 1 = fully quantized); it is held in the
    non-persistent fp32 buffer ``quant_lambda_t``.
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
        self.backend = backend
        self.register_buffer("quant_lambda_t", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self.quant_lambda = quant_lambda
        self._act_share = None  # a _SharedActQuant when siblings read the same input
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
        new.quant_lambda_t = torch.full((), new.quant_lambda, dtype=torch.float32, device=w.device)
        new._resolve_now()
        if new.rms_norm is not None:
            new.rms_norm = BitLinearRMSNorm(linear.in_features, new.rms_norm.variance_epsilon).to(
                device=w.device, dtype=w.dtype
            )
        return new

    # -- backend: resolved once per device type, not per forward ---------------------------------

    @property
    def backend(self) -> str:
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, name: str) -> None:
        self.__dict__["_backend"] = _check_backend(name, "BitLinear(backend=...)")
        self._resolve_now()

    def _resolve_now(self) -> None:
        """Resolve for the weight's device now (so a compiled forward finds it done); a backend
        that cannot run there (triton on the CPU) is reported by the first forward instead."""
        resolved = {}
        w = self.__dict__.get("_parameters", {}).get("weight")
        if w is not None and w.device.type != "meta":
            try:
                resolved[w.device.type] = resolve_backend(self.backend, w.device)
            except RuntimeError:
                pass
        self.__dict__["_resolved"] = resolved

    def _backend_for(self, device: torch.device) -> str:
        resolved = self._resolved
        name = resolved.get(device.type)
        if name is None:
            name = resolved[device.type] = resolve_backend(self.backend, device)
        return name

    # -- quant_lambda: a tensor the forward reads, a float mirror for Python ----------------------

    @property
    def quant_lambda(self) -> float:
        return self.__dict__["_lam"]

    @quant_lambda.setter
    def quant_lambda(self, value: float) -> None:
        value = float(value)
        with torch.no_grad():
            self.quant_lambda_t.fill_(value)
        self.__dict__["_lam"] = value
        # the regime is the only Python-level branch: it changes at most twice per warm-up
        self.__dict__["_lam_mode"] = "off" if value <= 0.0 else ("quant" if value >= 1.0 else "blend")

    def init_buffers(self) -> None:
        """Fill the buffers from the layer's Python state (called by the meta-device build,
        :func:`bitnet_train.distributed.materialize`, which gives buffers fresh storage)."""
        self.quant_lambda = self.quant_lambda

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        lam = self._buffers.get("quant_lambda_t")
        if lam is not None and lam.dtype != torch.float32:  # .to(bfloat16) must not round λ
            self._buffers["quant_lambda_t"] = torch.full((), self.quant_lambda, dtype=torch.float32, device=lam.device)
        self._resolve_now()  # a device move resolves the backend again
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        mode = self._lam_mode
        if mode == "off":
            return F.linear(x, self.weight, self.bias)
        if mode == "blend":
            # branch-free in λ (a tensor): the same arithmetic as quant.bitlinear_reference(x, w, b, λ)
            lam = self.quant_lambda_t
            xb = quant.blend(x, quant.act_fake_quant_values(x), lam)
            wb = quant.blend(self.weight, quant.weight_fake_quant_values(self.weight), lam)
            return F.linear(xb, wb, self.bias)
        backend = self._backend_for(x.device)
        compiling = torch.compiler.is_compiling()
        # codes shared by q/k/v (gate/up); skipped under torch.compile (the compiler sees the graph)
        share = self._act_share if not compiling else None
        if backend == "triton":
            from .kernels import bitlinear_triton, matmul

            wq = self._quantized_weight()
            if (
                wq is not None
                and x.shape[-1] > 0
                and x.numel() // x.shape[-1] <= matmul.GEMV_MAX_M
                and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias)))
            ):
                # decoding without autograd: the GEMV kernel on 2-bit packed codes (cached with the int8
                # ones), the same output bits; up to GEMV_FUSED_QUANT_MAX_M rows it quantizes x itself
                fused = x.numel() // x.shape[-1] <= matmul.GEMV_FUSED_QUANT_MAX_M
                act_q = share.codes(x, "triton") if share is not None and not fused else None
                return matmul.ternary_matmul(x, self._packed_weight(), wq[1], self.bias, act_q=act_q)
            return bitlinear_triton(x, self.weight, self.bias, wq, share.codes(x, "triton") if share is not None else None)
        xq, a = share.codes(x, "torch") if share is not None else quant.act_quant(x)
        recompute = self.recompute_weight_codes and torch.is_grad_enabled() and self.weight.requires_grad
        if compiling or recompute:
            wq, s = quant.weight_quant(self.weight)
        else:
            wq, s = self._torch_weight_codes()
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            cdt = torch.get_autocast_dtype(dev)
        elif self.exact_training_forward and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            cdt = x.dtype  # training: the exact product in the model's own dtype
        else:
            cdt = None  # inference without autocast: stock transformers' arithmetic
        release = "recompute" if recompute else (None if compiling else self._release_torch_weight_codes)
        return _BitLinearFn.apply(x, self.weight, self.bias, xq, a, wq, s, cdt, release)

    # training forwards (autograd recording) without autocast compute the exact integer product too;
    # False keeps stock transformers' fake-quant arithmetic there (see the module notes)
    exact_training_forward = True
    # True (the default): training keeps no weight codes between forward and backward (the backward
    # quantizes the saved latent weight again): a quarter of the fp32 linear weights less memory at
    # the activation peak, for one more weight quantization per layer and step (not measurable in
    # the 125m step of docs/performance.md); activation-checkpointing recomputes quantize again.
    # False: the codes are cached from the forward to the backward (recomputes reuse them).
    recompute_weight_codes = True

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
    share_input_quantization(model)
    return converted


def share_input_quantization(model: nn.Module) -> list[tuple[str, ...]]:
    """Let sibling BitLinear layers that read the same input (``SHARED_INPUT_GROUPS``: q/k/v,
    gate/up) quantize it once. Only siblings with the same input width and no input RMSNorm of
    their own (whose inputs would differ) are grouped; the state dict is unchanged. The sharing is
    a check at run time (the same tensor object, not modified since), so a group whose members are
    called on different inputs still computes each one's own codes. Both backends share, each
    layer with its own backend's quantizer (``_SharedActQuant``). Returns the grouped names."""
    groups = []
    for pname, parent in model.named_modules():
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, BitLinear) and m.rms_norm is None for m in members):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            share = _SharedActQuant(len(members))
            for m in members:
                m._act_share = share
            groups.append(tuple(f"{pname}.{n}" if pname else n for n in names))
    return groups


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
