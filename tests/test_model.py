"""BitLinear, the swap function, presets, checkpoints and the stock-transformers round trip."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import bitnet_train
from bitnet_train import BitLinear, quant
from bitnet_train.layers.backends import resolve_backend
from bitnet_train.checkpoint.format import CheckpointError
from bitnet_train.modeling.models import ModelSpecError


def tiny_llama():
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_bitlinear_is_a_linear_with_plain_state_dict():
    lin = nn.Linear(16, 8, bias=True)
    bl = BitLinear.from_linear(lin)
    assert isinstance(bl, nn.Linear)
    assert set(bl.state_dict()) == {"weight", "bias"}
    assert torch.equal(bl.weight, lin.weight) and bl.weight is not lin.weight
    x = torch.randn(3, 16)
    with torch.no_grad():  # inference: stock transformers' fake-quant arithmetic, bit for bit
        assert torch.equal(bl(x), quant.bitlinear_reference(x, lin.weight, lin.bias))
    bl.quant_lambda = 0.0
    assert torch.equal(bl(x), lin(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitlinear_trains_latent_weights(dtype):
    bl = BitLinear(16, 8, dtype=dtype)
    before = bl.weight.detach().clone()
    opt = torch.optim.SGD(bl.parameters(), lr=0.1)
    bl(torch.randn(4, 16, dtype=dtype)).float().pow(2).sum().backward()
    assert bl.weight.grad is not None and bl.weight.grad.dtype == dtype
    opt.step()
    assert not torch.equal(before, bl.weight)


def test_swap_on_llama_keeps_head_embeddings_norms():
    m = tiny_llama()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    names = bitnet_train.convert_to_bitlinear(m)
    assert len(names) == 2 * 7
    assert type(m.lm_head) is nn.Linear
    assert isinstance(m.model.embed_tokens, nn.Embedding)
    for layer in m.model.layers:
        for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert isinstance(proj, BitLinear)
    # weights copied exactly, same state dict keys
    sd = m.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    ids = torch.randint(0, 128, (1, 6))
    assert torch.isfinite(m(ids).logits).all()


def test_swap_exclusion_list_and_errors():
    m = tiny_llama()
    names = bitnet_train.convert_to_bitlinear(m, exclude=["mlp.gate_proj", "model.layers.1.*"])
    assert "model.layers.0.mlp.gate_proj" not in names
    assert not any(n.startswith("model.layers.1.") for n in names)
    assert "model.layers.0.mlp.up_proj" in names
    with pytest.raises(ValueError, match="no eligible nn.Linear"):
        bitnet_train.convert_to_bitlinear(nn.Sequential(nn.Embedding(4, 4)))


def test_backend_switch_and_env(monkeypatch):
    m = bitnet_train.build_model("tiny", backend="torch")
    assert {x.backend for _, x in bitnet_train.layers.bitlinear.bitlinear_modules(m)} == {"torch"}
    bitnet_train.set_backend(m, "auto")
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("BITNET_TRAIN_BACKEND", "torch")
    assert resolve_backend("triton", cpu) == "torch"
    monkeypatch.setenv("BITNET_TRAIN_BACKEND", "fast")
    with pytest.raises(ValueError, match="BITNET_TRAIN_BACKEND"):
        resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="unknown BitLinear backend"):
        bitnet_train.set_backend(m, "cuda")


def test_presets():
    names = bitnet_train.list_presets()
    for n in ["tiny", "125m", "350m", "700m", "1.3b", "2b4t", "tiny-silu", "2b4t-silu"]:
        assert n in names
    p = bitnet_train.load_preset("2b4t")
    assert (p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"], p["num_key_value_heads"]) == (2560, 30, 20, 5)
    assert (p["intermediate_size"], p["vocab_size"], p["rope_theta"], p["hidden_act"]) == (6912, 128256, 500000.0, "relu2")
    assert p["max_position_embeddings"] == 4096
    assert bitnet_train.load_preset("tiny-silu")["hidden_act"] == "silu"
    with torch.device("meta"):
        m = bitnet_train.build_model("2b4t")
    assert sum(x.numel() for x in m.parameters()) == 2_412_820_480
    tiny = bitnet_train.build_model("tiny")
    assert 1_000_000 < sum(x.numel() for x in tiny.parameters()) < 10_000_000


def test_preset_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="unknown model preset 'nope'.*tiny"):
        bitnet_train.load_model("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\nhiden_act: silu\n")
    with pytest.raises(ModelSpecError, match=r"bad.yaml: unknown key 'hiden_act'"):
        bitnet_train.load_model(str(bad))
    bad.write_text("inherit: tiny\nhidden_act: gelu\n")
    with pytest.raises(ModelSpecError, match=r"bad.yaml: key 'hidden_act' is 'gelu'"):
        bitnet_train.load_model(str(bad))
    bad.write_text("inherit: tiny\nnum_hidden_layers: two\n")
    with pytest.raises(ModelSpecError, match="num_hidden_layers"):
        bitnet_train.load_model(str(bad))


STOCK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    assert "bitnet_train" not in sys.modules
    names = sorted(type(x).__name__ for x in m.modules() if isinstance(x, torch.nn.Linear))
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save({"logits": m(ids).logits, "classes": names}, sys.argv[3])
    """
)


def stock_logits(ckpt, ids, tmp_path, compiled=False):
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ)
    if not compiled:
        # transformers runs its quantizers under torch.compile; eager mode gives the exact math
        env["TORCHDYNAMO_DISABLE"] = "1"
    subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True, env=env, cwd=tmp_path,
    )
    return torch.load(tmp_path / "out.pt")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("preset", ["tiny", "tiny-silu"])
def test_stock_transformers_roundtrip(preset, tmp_path):
    m = bitnet_train.build_model(preset, seed=1).eval()
    ckpt = tmp_path / "ckpt"
    bitnet_train.save_checkpoint(m, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["linear_class"], qc["quantization_mode"]) == ("bitnet", "autobitlinear", "online")
    assert (ckpt / "generation_config.json").is_file() and (ckpt / "model.safetensors").is_file()
    ids = torch.randint(0, m.config.vocab_size, (2, 24))
    with torch.no_grad():
        ours = m(ids).logits
    out = stock_logits(ckpt, ids, tmp_path)
    assert set(out["classes"]) == {"AutoBitLinear", "Linear"} and out["classes"].count("Linear") <= 1
    # transformers' eager path (TORCHDYNAMO_DISABLE=1) computes exactly our logits, bit for bit; its
    # default path runs the quantizers under torch.compile and differs (1.1e-2 relative measured on a
    # tiny init checkpoint), which is why the README names the eager path as the exact one
    assert torch.equal(ours, out["logits"]), rel(ours, out["logits"])
    # and our loader reads the same directory back
    again = bitnet_train.load_model(ckpt).eval()
    assert isinstance(again.model.layers[0].mlp.up_proj, BitLinear)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)


def test_untied_head_and_quant_none(tmp_path):
    m = bitnet_train.build_model("tiny", seed=2, tie_word_embeddings=False).eval()
    assert m.lm_head.weight is not m.model.embed_tokens.weight and type(m.lm_head) is nn.Linear
    bitnet_train.save_checkpoint(m, tmp_path / "u")
    ids = torch.randint(0, m.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert rel(m(ids).logits, stock_logits(tmp_path / "u", ids, tmp_path)["logits"]) < 1e-4
    base = bitnet_train.build_model("tiny", quant="none", seed=3).eval()
    assert not bitnet_train.layers.bitlinear.bitlinear_modules(base)
    bitnet_train.save_checkpoint(base, tmp_path / "fp")
    assert "quantization_config" not in json.loads((tmp_path / "fp" / "config.json").read_text())
    back = bitnet_train.load_model(tmp_path / "fp")
    assert not bitnet_train.layers.bitlinear.bitlinear_modules(back)


def test_2b4t_bf16_layout_loads(tmp_path):
    """A tiny model saved the way microsoft/bitnet-b1.58-2B-4T-bf16 is laid out."""
    src = bitnet_train.build_model("tiny", quant="none", seed=4).to(torch.bfloat16)
    d = tmp_path / "bitnet-bf16"
    src.save_pretrained(d, safe_serialization=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("bitnet_train", None)
    cfg.update(
        architectures=["BitNetForCausalLM"], model_type="bitnet", torch_dtype="bfloat16",
        quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"},
        hidden_act="relu2", tie_word_embeddings=True,
    )
    (d / "config.json").write_text(json.dumps(cfg))
    m = bitnet_train.load_model(d).eval()
    assert isinstance(m.model.layers[0].self_attn.q_proj, BitLinear)
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.equal(m.model.layers[1].mlp.gate_proj.weight, src.model.layers[1].mlp.gate_proj.weight.float())
    ids = torch.randint(0, m.config.vocab_size, (1, 12))
    with torch.no_grad():
        ours = m(ids).logits
    assert rel(ours, stock_logits(d, ids, tmp_path)["logits"]) < 1e-4
    # and a packed (offline) checkpoint is refused with the reason
    cfg["quantization_config"]["quantization_mode"] = "offline"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no latent weights"):
        bitnet_train.load_model(d)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        bitnet_train.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        bitnet_train.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="'gptq'"):
        bitnet_train.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="architecture 'llama', expected 'bitnet'"):
        bitnet_train.load_checkpoint(tmp_path, expect_model_type="bitnet")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(CheckpointError, match="not a causal language model"):
        bitnet_train.load_checkpoint(tmp_path)


def test_atomic_save_keeps_previous_on_failure(tmp_path):
    m = bitnet_train.build_model("tiny", seed=5)
    d = tmp_path / "ck"
    bitnet_train.save_checkpoint(m, d)
    before = (d / "model.safetensors").read_bytes()

    def boom(tmp):
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        bitnet_train.save_checkpoint(bitnet_train.build_model("tiny", seed=6), d, write_extra=boom)
    assert (d / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_hf_prefix_missing_model_is_a_clear_error(tmp_path):
    # offline (HF_HUB_OFFLINE=1): a hub id that is not cached, or a directory that does not exist
    with pytest.raises(ModelSpecError, match="hf:"):
        bitnet_train.load_model(f"hf:{tmp_path}/no-such-model")


# ---------------------------------------------------------------------------------------------
# the torch backend's autograd.Function: what it saves, what it computes, what it reuses
# ---------------------------------------------------------------------------------------------


def _reference_grads(x, w, b, g, lam=1.0, autocast=False):
    """Gradients of the fake-quant path (quant.bitlinear_reference, what BitLinear ran before)."""
    x1 = x.detach().clone().requires_grad_(True)
    w1 = w.detach().clone().requires_grad_(True)
    b1 = b.detach().clone().requires_grad_(True) if b is not None else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = quant.bitlinear_reference(x1, w1, b1, lam)
    y.backward(g)
    return y, x1.grad, w1.grad, (b1.grad if b is not None else None)


@pytest.mark.parametrize("shape,bias", [((2, 5, 48), True), ((2, 5, 48), False), ((7, 48), True)])
@pytest.mark.parametrize("mode", ["fp32", "autocast", "blend", "off"])
def test_bitlinear_gradients_equal_the_fake_quant_path(shape, bias, mode):
    # torch.equal, not allclose: the backward issues the same two GEMMs on the same operands
    # (W_deq and x_deq rebuilt bit for bit from the codes, in the dtype the old path multiplied in)
    lam = {"blend": 0.35, "off": 0.0}.get(mode, 1.0)
    autocast = mode == "autocast"
    lin = BitLinear(48, 40, bias=bias, backend="torch", quant_lambda=lam)
    x = torch.randn(shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = lin(x)
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)
    ry, gx, gw, gb = _reference_grads(x, lin.weight, lin.bias, g, lam, autocast)
    assert y.dtype == ry.dtype
    assert torch.equal(x.grad, gx) and torch.equal(lin.weight.grad, gw)
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    if bias:
        assert torch.equal(lin.bias.grad, gb)
    if mode in ("blend", "off"):  # the warm-up regimes keep the fake-quant forward
        assert torch.equal(y, ry)
    else:  # training at λ = 1 (with or without autocast): the exact integer product, rounded once
        xq, a = quant.act_quant(x)
        wq, s = quant.weight_quant(lin.weight)
        assert torch.equal(y, quant.int_linear(xq, a, wq, s, lin.bias, y.dtype))
        if mode == "fp32":  # fp32 rounding apart, the same numbers as the fake-quant product
            torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
            with torch.no_grad():  # and inference is the fake-quant product itself
                assert torch.equal(lin(x), ry)


def test_bitlinear_gradients_with_create_graph():
    # torch.autograd.grad(create_graph=True) runs the backward with grad mode on: the weight's
    # gradient then takes the differentiable product, not the out= one, and is the same bits
    lin = BitLinear(48, 40, bias=False, backend="torch")
    x = torch.randn(3, 48, requires_grad=True)
    g = torch.randn(3, 40)
    plain = torch.autograd.grad(lin(x), (x, lin.weight), g)
    graph = torch.autograd.grad(lin(x), (x, lin.weight), g, create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, graph))


def test_bitlinear_bf16_weights_without_autocast():
    # a model held in bf16: training computes the exact product rounded once to bf16, the gradients
    # are the fake-quant path's, and inference keeps stock transformers' bf16 arithmetic
    lin = BitLinear(64, 24, bias=False, backend="torch", dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    ry, gx, gw, _ = _reference_grads(x, lin.weight, None, g)
    assert torch.equal(x.grad, gx) and torch.equal(lin.weight.grad, gw)
    xq, a = quant.act_quant(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, quant.int_linear(xq, a, *quant.weight_quant(lin.weight), None, torch.bfloat16))
    with torch.no_grad():
        assert torch.equal(lin(x), ry)


@pytest.mark.parametrize("recompute", [False, True])
def test_bitlinear_saves_codes_not_fake_quantized_copies(recompute):
    lin = BitLinear(96, 80, bias=True, backend="torch")
    lin.recompute_weight_codes = recompute
    x = torch.randn(4, 6, 96, requires_grad=True)
    for autocast in (False, True):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = lin(x)
        big = [t for t in saved if t.numel() >= 96]
        if recompute:  # the latent weight itself (no copy), re-quantized by the backward
            assert len(big) == 2 and big[0].dtype == torch.int8 and big[1] is lin.weight
        else:
            # the activation codes [4, 6, 96] and the weight codes [80, 96], both int8; no float copy
            # of x or W (nor the latent weight itself); the scales are [4, 6, 1] and a 0-dim fp32
            assert sorted((tuple(t.shape), t.dtype) for t in big) == [((4, 6, 96), torch.int8), ((80, 96), torch.int8)]
        assert all(t.dtype == torch.float32 and t.numel() in (1, 24) for t in saved if t.numel() < 96)
        y.float().sum().backward()
        g = lin.weight.grad.clone()
        lin.weight.grad = None
        _, _, gw, _ = _reference_grads(x, lin.weight, lin.bias, torch.ones_like(y), autocast=autocast)
        assert torch.equal(g, gw)


def test_bitlinear_under_bf16_autocast_is_the_exact_integer_product():
    # the issue measured 57.3% of a 2560x2560 layer's outputs at 64 tokens equal to the exact result
    # with F.linear on dequantized operands; this smaller shape shows the same failure of that path
    torch.manual_seed(0)
    lin = BitLinear(1024, 512, bias=False, backend="torch")
    x = torch.randn(64, 1024)
    xq, a = quant.act_quant(x)
    wq, s = quant.weight_quant(lin.weight)
    acc = (xq.long() @ wq.long().t()).float()  # int64: exact by construction
    exact = ((acc / a) / (1.0 / s)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        old = quant.bitlinear_reference(x, lin.weight)  # the former path
    assert y.dtype == torch.bfloat16 and torch.equal(y, exact)
    assert (old == exact).float().mean().item() < 0.9  # the old path fails this test
    # and against the float64 truth, the one rounding is within half a bf16 ulp plus fp32 noise
    truth = (xq.double() @ wq.double().t()) / a.double() * s.double()
    assert ((y.double() - truth).abs() <= truth.abs() * 2.0**-8 * 1.001 + 1e-30).all()


def test_shared_input_quantized_once_and_identical(monkeypatch):
    m = bitnet_train.build_model("tiny", seed=7, backend="torch", num_hidden_layers=2)
    groups = bitnet_train.layers.bitlinear.share_input_quantization(m)
    assert len(groups) == 2 * 2 and ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in groups
    unshared = bitnet_train.build_model("tiny", seed=7, backend="torch", num_hidden_layers=2)
    unshared.load_state_dict(m.state_dict())
    for _, b in bitnet_train.layers.bitlinear.bitlinear_modules(unshared):
        b.act_share = None
    assert set(m.state_dict()) == set(unshared.state_dict())  # the sharing adds no state
    calls = []
    real = quant.act_quant
    monkeypatch.setattr(quant, "act_quant", lambda x: (calls.append(tuple(x.shape)), real(x))[1])
    ids = torch.randint(0, m.config.vocab_size, (2, 12))
    out = m(ids).logits
    # per layer: q/k/v once, o once, gate/up once, down once
    assert len(calls) == 4 * 2, calls
    calls.clear()
    ref = unshared(ids).logits
    assert len(calls) == 7 * 2
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), unshared.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    # the shared codes do not outlive the forward
    assert all(b.act_share is None or b.act_share._entry is None for _, b in bitnet_train.layers.bitlinear.bitlinear_modules(m))


def test_shared_input_is_checked_at_run_time():
    # siblings called on different tensors (or on one modified in place) each get their own codes
    m = bitnet_train.build_model("tiny", seed=8, backend="torch", num_hidden_layers=1)
    attn = m.model.layers[0].self_attn
    h = torch.randn(2, 5, m.config.hidden_size)
    h2 = torch.randn(2, 5, m.config.hidden_size)
    with torch.no_grad():  # inference arithmetic: comparable bit for bit with the fake-quant reference
        y_q = attn.q_proj(h)
        y_k = attn.k_proj(h2)
        assert torch.equal(y_k, quant.bitlinear_reference(h2, attn.k_proj.weight))
        h.mul_(2)
        assert torch.equal(attn.v_proj(h), quant.bitlinear_reference(h, attn.v_proj.weight))
        assert torch.equal(y_q, quant.bitlinear_reference(h / 2, attn.q_proj.weight))


@pytest.mark.parametrize("recompute", [False, True])
def test_checkpoint_recompute_and_weight_codes(monkeypatch, recompute):
    m = bitnet_train.build_model("tiny", seed=9, backend="torch", num_hidden_layers=2)
    bitnet_train.layers.bitlinear.set_switches(m, recompute_weight_codes=recompute)
    m.activation_checkpointing_enable()
    m.train()
    n_bit = len(bitnet_train.layers.bitlinear.bitlinear_modules(m))
    calls = []
    real = quant.weight_quant
    monkeypatch.setattr(quant, "weight_quant", lambda w, *scale: (calls.append(1), real(w, *scale))[1])
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ids = torch.randint(0, m.config.vocab_size, (2, 12))
    for _ in range(2):
        calls.clear()
        m(ids, labels=ids).loss.backward()
        # cached codes: once per layer per step, not again in the recompute; recomputed codes:
        # forward, checkpoint recompute and backward
        assert len(calls) == (3 * n_bit if recompute else n_bit)
        opt.step()
        opt.zero_grad()
    # after the backward no layer keeps its codes (no memory at the optimizer step) ...
    assert not any(b.weight_codes.torch_entry is not None for _, b in bitnet_train.layers.bitlinear.bitlinear_modules(m))
    # ... while inference keeps them: a second no-grad forward quantizes nothing
    with torch.no_grad():
        m(ids)
        calls.clear()
        m(ids)
    assert calls == []



def test_weight_codes_follow_a_tracked_source():
    # FSDP2's pattern: the layer's weight is refilled from a (sharded) source before each forward
    # with its own version counter preserved, so only the source's version shows the change
    lin = BitLinear(16, 8, backend="torch")
    src = torch.randn(8, 16)
    x = torch.randn(3, 16)

    def refill():
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(lin.weight):
            lin.weight.copy_(src)

    for tracked in (False, True):
        lin.track_weight_source(src if tracked else None)
        refill()
        with torch.no_grad():
            lin(x)  # caches the codes of this weight
            src.mul_(-1)  # an optimizer step on the source: a version bump there only
            refill()
            y = lin(x)
        fresh = torch.equal(y, quant.bitlinear_reference(x, src))
        assert fresh == tracked, f"tracked={tracked}: the cache {'served stale' if tracked else 'missed the'} codes"

def test_quant_lambda_is_an_fp32_buffer_outside_the_state_dict():
    m = bitnet_train.build_model("tiny", seed=10, backend="torch", num_hidden_layers=1)
    q = m.model.layers[0].self_attn.q_proj
    bitnet_train.set_quant_lambda(m, 0.3)
    assert q.quant_lambda == 0.3 and q.quant_lambda_t.dtype == torch.float32
    assert q.quant_lambda_t.item() == torch.tensor(0.3).item()
    assert not any("quant_lambda" in k for k in m.state_dict())
    m.to(torch.bfloat16)
    assert q.quant_lambda_t.dtype == torch.float32 and q.quant_lambda_t.item() == torch.tensor(0.3).item()
    assert q.weight.dtype == torch.bfloat16


def test_backend_is_resolved_once_not_per_forward(monkeypatch):
    calls = []
    real = bitnet_train.layers.bitlinear.resolve_backend
    monkeypatch.setattr(bitnet_train.layers.bitlinear, "resolve_backend", lambda *a: (calls.append(a), real(*a))[1])
    lin = BitLinear(16, 8, backend="auto")
    x = torch.randn(2, 16)
    for _ in range(3):
        lin(x)
    assert len(calls) == 1
    monkeypatch.setenv("BITNET_TRAIN_BACKEND", "fast")
    lin(x)  # read when resolved, not per forward
    assert len(calls) == 1
    with pytest.raises(ValueError, match="BITNET_TRAIN_BACKEND"):  # set_backend resolves again
        bitnet_train.set_backend(nn.Sequential(lin), "torch")


def test_compiled_warmup_does_not_recompile_per_step():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = bitnet_train.build_model("tiny", seed=11, backend="torch", num_hidden_layers=1, hidden_size=64,
                                 intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, vocab_size=96)
    m.train()
    cnt = CompileCounter()
    step_fn = torch.compile(lambda ids: m(ids, labels=ids).loss, backend=cnt)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    ids = torch.randint(0, 96, (2, 16))

    def step(lam):
        bitnet_train.set_quant_lambda(m, lam)
        loss = step_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    step(0.05)  # warm-up: compiles the blend regime
    frames = cnt.frame_count
    assert frames >= 1
    losses = [step(lam) for lam in (0.1, 0.3, 0.55, 0.8, 0.95)]
    assert cnt.frame_count == frames, "a new λ recompiled"
    assert all(torch.isfinite(torch.tensor(losses)))
    step(1.0)  # the regime changes once ...
    after = cnt.frame_count
    step(1.0)
    step(1.0)
    assert cnt.frame_count == after  # ... and stays compiled
    torch._dynamo.reset()


def test_bitlinear_state_is_set_in_init_and_switches_are_checked():
    import copy

    from bitnet_train.layers.bitlinear import BLEND, FULL_PRECISION, SWITCHES, TERNARY, set_switches

    lin = BitLinear(16, 8, backend="torch", quant_lambda=0.5, recompute_weight_codes=False)
    state = vars(lin)
    for name in ("regime", "resolved", "weight_codes", "act_share", *SWITCHES):
        assert name in state, name  # a plain attribute from __init__, not made later by a forward
    assert lin.regime == BLEND and lin.resolved == {"cpu": "torch"} and lin.recompute_weight_codes is False
    lin.quant_lambda = 0.0
    assert lin.regime == FULL_PRECISION
    lin.quant_lambda = 1.0
    assert lin.regime == TERNARY
    with torch.no_grad():
        lin(torch.randn(2, 16))
    assert lin.weight_codes.torch_entry is not None  # inference keeps its codes ...
    assert copy.deepcopy(lin).weight_codes.torch_entry is None  # ... a copy starts without them
    with pytest.raises(TypeError, match="unknown switch fast"):
        BitLinear(16, 8, fast=True)
    with pytest.raises(ValueError, match="unknown switch fast"):
        set_switches(nn.Sequential(lin), fast=True)
    set_switches(nn.Sequential(lin), cache_weight_codes=False)
    lin.clear_weight_cache()
    with torch.no_grad():
        lin(torch.randn(2, 16))
    assert lin.weight_codes.torch_entry is None
