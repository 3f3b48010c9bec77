"""BitLinear and the converter that swaps a built model's ``nn.Linear`` layers for it.

The quantization math lives in :mod:`bitnet_train.quant`; this file only wires it into a layer.
Which backend runs (``torch``, ``triton``, ``auto``): :mod:`bitnet_train.layers.backends`. The backend is
set per layer (``BitLinear.backend``, or :func:`set_backend` for a whole model) and resolved once per
layer and device type — at its first forward after construction, ``set_backend``, an assignment to
``.backend`` or a move (``.to``) — not per forward.

What the ``torch`` backend computes, and why: :mod:`bitnet_train.layers.bitlinear_torch`, with the
layer's parts: the shared activation codes (q/k/v, gate/up; both backends) and the weight codes'
cache. The layer's state and its forward paths: :class:`BitLinear`'s docstring.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_train import quant
from bitnet_train.layers.backends import check_backend, resolve_backend
from bitnet_train.layers.bitlinear_torch import BitLinearRMSNorm, SharedActQuant, TorchBitLinearFn, WeightCodes

# Modules never converted: embeddings and norms are not nn.Linear; the output head is.
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "output", "score", "classifier")

# sibling projections that read the same input tensor (transformers' Llama-family attention and MLP)
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# The layer's behaviour switches: instance attributes of every BitLinear, set in its __init__ from
# these defaults (keyword arguments of BitLinear, or set_switches(model, ...) for a built model).
SWITCHES = {
    # training forwards (autograd recording) without autocast compute the exact integer product too;
    # False keeps stock transformers' fake-quant arithmetic there (bitlinear_torch's notes)
    "exact_training_forward": True,
    # True: training keeps no weight codes between forward and backward (the backward quantizes the
    # saved latent weight again): a quarter of the fp32 linear weights less memory at the activation
    # peak, for one more weight quantization per layer and step (not measurable in the 125m step of
    # docs/performance.md); activation-checkpointing recomputes quantize again. False: the codes are
    # cached from the forward to the backward (recomputes reuse them).
    "recompute_weight_codes": True,
    # False: no weight-code cache at all (every forward quantizes the weight; WeightCodes' notes)
    "cache_weight_codes": True,
}

# quant_lambda's regimes, the only Python-level branch on λ (it changes at most twice per warm-up)
FULL_PRECISION, BLEND, TERNARY = "full_precision", "blend", "ternary"


class BitLinear(nn.Linear):
    """A linear layer with absmean ternary weights and per-token absmax int8 activations.

    Parameters and state dict are those of ``nn.Linear`` (``weight``, optional ``bias``), holding
    the latent full-precision weights that the straight-through estimator trains, and of the
    optional input ``rms_norm``. Everything else, set in ``__init__``:

    * ``quant_lambda`` in [0, 1] blends quantization in (0 = full precision, 1 = fully quantized),
      held in the non-persistent fp32 buffer ``quant_lambda_t`` that the forward reads; its regime
      (``FULL_PRECISION``, ``BLEND``, ``TERNARY``) picks the forward path;
    * ``backend`` as requested and the backend it resolved to per device type (``resolved``);
    * ``weight_codes``: the cached ternary codes of the weight (:class:`WeightCodes`);
    * ``act_share``: the activation codes shared with sibling projections (``SharedActQuant``, set
      by :func:`share_input_quantization`) or None;
    * the behaviour switches of ``SWITCHES`` (keyword arguments here).

    The forward's paths: :meth:`forward_full_precision`, :meth:`forward_blend`,
    :meth:`forward_torch`, :meth:`forward_triton` and :meth:`forward_triton_decode`.
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
        **switches: bool,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("quant_lambda_t", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self._lam = 1.0
        self.regime = TERNARY
        self._backend = "auto"
        self.resolved: dict[str, str] = {}  # device type -> the backend that runs there
        self.weight_codes = WeightCodes()
        self.act_share: SharedActQuant | None = None
        for name, default in SWITCHES.items():
            setattr(self, name, bool(switches.pop(name, default)))
        if switches:
            raise TypeError(f"BitLinear: unknown switch {', '.join(switches)}; the switches are {', '.join(SWITCHES)}")
        self.rms_norm = BitLinearRMSNorm(in_features, rms_norm_eps) if use_rms_norm else None
        if self.rms_norm is not None and device is not None:
            self.rms_norm.to(device=device, dtype=dtype)
        self.backend = backend
        self.quant_lambda = quant_lambda

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
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend(name, "BitLinear(backend=...)")
        self._resolve_now()

    def _resolve_now(self) -> None:
        """Resolve for the weight's device now (so a compiled forward finds it done); a backend
        that cannot run there (triton on the CPU) is reported by the first forward instead."""
        self.resolved = {}
        w = self._parameters.get("weight")
        if w is not None and w.device.type != "meta":
            try:
                self.resolved[w.device.type] = resolve_backend(self.backend, w.device)
            except RuntimeError:
                pass

    def backend_for(self, device: torch.device) -> str:
        name = self.resolved.get(device.type)
        if name is None:
            name = self.resolved[device.type] = resolve_backend(self.backend, device)
        return name

    # -- quant_lambda: a tensor the forward reads, a float mirror for Python ----------------------

    @property
    def quant_lambda(self) -> float:
        return self._lam

    @quant_lambda.setter
    def quant_lambda(self, value: float) -> None:
        value = float(value)
        with torch.no_grad():
            self.quant_lambda_t.fill_(value)
        self._lam = value
        self.regime = FULL_PRECISION if value <= 0.0 else (TERNARY if value >= 1.0 else BLEND)

    def init_buffers(self) -> None:
        """Fill the buffers from the layer's Python state (called by the meta-device build,
        :func:`bitnet_train.training.distributed.materialize`, which gives buffers fresh storage)."""
        self.quant_lambda = self.quant_lambda

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        lam = self._buffers.get("quant_lambda_t")
        if lam is not None and lam.dtype != torch.float32:  # .to(bfloat16) must not round λ
            self._buffers["quant_lambda_t"] = torch.full((), self.quant_lambda, dtype=torch.float32, device=lam.device)
        self._resolve_now()  # a device move resolves the backend again
        return self

    # -- the weight codes' cache -------------------------------------------------------------------

    def clear_weight_cache(self) -> None:
        """Drop the cached ternary codes (after a write that bypasses autograd's version counter)."""
        self.weight_codes.clear()

    def track_weight_source(self, source: torch.Tensor | None) -> None:
        """Key the cached codes on ``source``'s version too (:meth:`WeightCodes.track`)."""
        self.weight_codes.track(source)

    def _cacheable(self) -> bool:
        return self.cache_weight_codes and not self.weight.is_inference()

    # -- the forward and its paths -------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        if self.regime == FULL_PRECISION:
            return self.forward_full_precision(x)
        if self.regime == BLEND:
            return self.forward_blend(x)
        if self.backend_for(x.device) == "triton":
            if self._decoding(x):
                return self.forward_triton_decode(x)
            return self.forward_triton(x)
        return self.forward_torch(x)

    def forward_full_precision(self, x: torch.Tensor) -> torch.Tensor:
        """λ = 0: the latent weights as an ``nn.Linear``."""
        return F.linear(x, self.weight, self.bias)

    def forward_blend(self, x: torch.Tensor) -> torch.Tensor:
        """0 < λ < 1, branch-free in λ (a tensor): ``quant.bitlinear_reference(x, w, b, λ)``'s arithmetic."""
        lam = self.quant_lambda_t
        xb = quant.blend(x, quant.act_fake_quant_values(x), lam)
        wb = quant.blend(self.weight, quant.weight_fake_quant_values(self.weight), lam)
        return F.linear(xb, wb, self.bias)

    def _shared(self) -> "SharedActQuant | None":
        # codes shared by q/k/v (gate/up); not under torch.compile (the compiler sees the graph)
        return None if torch.compiler.is_compiling() else self.act_share

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """λ = 1 on the ``torch`` backend: :class:`TorchBitLinearFn` (bitlinear_torch's notes say
        which arithmetic runs when)."""
        share = self._shared()
        xq, a = share.codes(x, "torch") if share is not None else quant.act_quant(x)
        compiling = torch.compiler.is_compiling()
        recompute = self.recompute_weight_codes and torch.is_grad_enabled() and self.weight.requires_grad
        cached = not (compiling or recompute) and self._cacheable()
        wq, s = self.weight_codes.torch_codes(self.weight) if cached else quant.weight_quant(self.weight)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            cdt = torch.get_autocast_dtype(dev)
        elif self.exact_training_forward and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            cdt = x.dtype  # training: the exact product in the model's own dtype
        else:
            cdt = None  # inference without autocast: stock transformers' arithmetic
        return TorchBitLinearFn.apply(x, self.weight, self.bias, xq, a, wq, s, cdt, recompute,
                                      self.weight_codes if cached else None)

    def _decoding(self, x: torch.Tensor) -> bool:
        """The Triton GEMV's case: few rows, no autograd recording, cached codes."""
        from bitnet_train.kernels import matmul

        return (
            self._cacheable()
            and x.shape[-1] > 0
            and x.numel() // x.shape[-1] <= matmul.GEMV_MAX_M
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias)))
        )

    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """λ = 1 on the ``triton`` backend: int8 codes through the tiled kernel, STE backward."""
        from bitnet_train.kernels import bitlinear_triton

        share = self._shared()
        wq = self.weight_codes.triton_codes(self.weight) if self._cacheable() else None
        return bitlinear_triton(x, self.weight, self.bias, wq, share.codes(x, "triton") if share is not None else None)

    def forward_triton_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decoding without autograd on the ``triton`` backend: the GEMV kernel on 2-bit packed codes
        (cached with the int8 ones), the same output bits as :meth:`forward_triton`; up to
        ``GEMV_FUSED_QUANT_MAX_M`` rows it quantizes ``x`` itself."""
        from bitnet_train.kernels import matmul

        share = self._shared()
        wq = self.weight_codes.triton_codes(self.weight)
        fused = x.numel() // x.shape[-1] <= matmul.GEMV_FUSED_QUANT_MAX_M
        act_q = share.codes(x, "triton") if share is not None and not fused else None
        return matmul.ternary_matmul(x, self.weight_codes.packed(), wq[1], self.bias, act_q=act_q)

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
    check_backend(backend, "convert_to_bitlinear(backend=...)")
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
    layer with its own backend's quantizer (``SharedActQuant``). Returns the grouped names."""
    groups = []
    for pname, parent in model.named_modules():
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, BitLinear) and m.rms_norm is None for m in members):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            share = SharedActQuant(len(members))
            for m in members:
                m.act_share = share
            groups.append(tuple(f"{pname}.{n}" if pname else n for n in names))
    return groups


def bitlinear_modules(model: nn.Module) -> list[tuple[str, BitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


def set_backend(model: nn.Module, backend: str) -> None:
    check_backend(backend, "set_backend")
    for _, m in bitlinear_modules(model):
        m.backend = backend


def set_switches(model: nn.Module, **switches: bool) -> None:
    """Set behaviour switches (names in ``SWITCHES``) on every BitLinear of ``model``."""
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise ValueError(f"set_switches: unknown switch {', '.join(unknown)}; the switches are {', '.join(SWITCHES)}")
    for _, m in bitlinear_modules(model):
        for name, value in switches.items():
            setattr(m, name, bool(value))


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
