"""Exports into the runtimes that run them: stock transformers (hf) and llama.cpp (gguf).

The models are tiny BitNets trained for a few steps on tinyshakespeare (a random init has
near-uniform logits, which makes top-1 agreement meaningless), probed on held-out text.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet_train.export import ExportError, export
from bitnet_train.export import gguf as G
from bitnet_train.export import verify as V

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except Exception:  # noqa: BLE001
    HAVE_LLAMA = False

REPO = Path(__file__).resolve().parents[1]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def make_checkpoint(out: Path, text: str, preset="tiny-silu", steps=40, seed=0, **over) -> Path:
    """A 2-layer hidden-256 BitNet with a 512-token byte-level BPE, trained ``steps`` steps."""
    from bitnet_train.checkpoint import save_checkpoint
    from bitnet_train.model import build_model
    from bitnet_train.tokenizer import train_bpe

    train = text[:300_000]
    tok = train_bpe([train[i : i + 20_000] for i in range(0, len(train), 20_000)], vocab_size=512)
    kw = dict(vocab_size=len(tok), intermediate_size=768, num_hidden_layers=2)
    kw.update(over)
    model = build_model(preset, seed=seed, backend="torch", **kw)
    if steps:
        ids = torch.tensor(tok(train)["input_ids"])
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            ix = torch.randint(0, len(ids) - 65, (16,), generator=g)
            x = torch.stack([ids[i : i + 64] for i in ix])
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(model, out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def text():
    from conftest import SHAKESPEARE

    # the shared copy (conftest), else $TINYSHAKESPEARE (a checkout outside the shared layout)
    for p in (SHAKESPEARE, Path(os.environ.get("TINYSHAKESPEARE", SHAKESPEARE))):
        if p.is_file():
            return _text(p)
    pytest.skip(f"{SHAKESPEARE} not found (set TINYSHAKESPEARE to a copy)")


@pytest.fixture(scope="module")
def probe(text):
    return text[900_000:903_000]  # held out: training uses the first 300k characters


@pytest.fixture(scope="module")
def silu_ckpt(tmp_path_factory, text):
    return make_checkpoint(tmp_path_factory.mktemp("silu") / "ckpt", text)


@pytest.fixture(scope="module")
def relu2_ckpt(tmp_path_factory, text):
    return make_checkpoint(tmp_path_factory.mktemp("relu2") / "ckpt", text, preset="tiny", steps=10, tie_word_embeddings=True)


def _quiet(*_a, **_k):
    pass


# ---------------------------------------------------------------------------------------------
# hf: stock transformers
# ---------------------------------------------------------------------------------------------


def test_hf_export_into_stock_transformers(silu_ckpt, probe, tmp_path):
    from safetensors import safe_open

    from bitnet_train.quant import unpack_hf, weight_quant

    out = tmp_path / "hf"
    r = export(silu_ckpt, "hf", out, probe_text=probe, log=_quiet)
    ag = r["agreement"]
    assert ag.ok and ag.rel_error < 1e-3 and ag.top1 == 1.0, str(ag)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["linear_class"], qc["quantization_mode"]) == ("bitnet", "bitlinear", "offline")
    # the documented convention: uint8 [out/4, in] codes + 1, weight_scale (1,) = 1 / mean|W|
    with safe_open(str(silu_ckpt / "model.safetensors"), "pt") as f:
        latent = f.get_tensor("model.layers.1.mlp.gate_proj.weight")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.1.mlp.gate_proj.weight")
        scale = f.get_tensor("model.layers.1.mlp.gate_proj.weight_scale")
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    codes, s = weight_quant(latent)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (latent.shape[0] // 4, latent.shape[1])
    assert torch.equal(unpack_hf(packed), codes)
    assert scale.shape == (1,) and torch.allclose(scale, 1.0 / s.reshape(1))
    assert (out / "tokenizer.json").is_file()


def test_hf_stock_transformers_in_clean_process(silu_ckpt, probe, tmp_path):
    """The exported directory needs no bitnet_train: a fresh interpreter with only transformers."""
    out = tmp_path / "hf"
    export(silu_ckpt, "hf", out, verify=False, log=_quiet)
    from transformers import AutoTokenizer

    ids = V.probe_ids(AutoTokenizer.from_pretrained(out), probe, 64)
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
        "assert 'bitnet_train' not in sys.modules\n"
        "ids = json.loads(sys.argv[2])\n"
        "with torch.no_grad(): print(json.dumps(m(torch.tensor([ids])).logits[0].tolist()))\n"
    )
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    res = subprocess.run([sys.executable, "-c", code, str(out), json.dumps(ids)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)  # not the repo root: its kernels/ shadows a package
    assert res.returncode == 0, res.stderr[-2000:]
    stock = np.array(json.loads(res.stdout.strip().splitlines()[-1]))
    ours = V.our_logits(silu_ckpt, ids)
    assert V.rel_error(stock, ours) < 1e-3


# ---------------------------------------------------------------------------------------------
# gguf: llama.cpp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["tq2_0", "tq1_0", "f32"])
@pytest.mark.llama
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_gguf_into_llama_cpp(silu_ckpt, probe, tmp_path, quant):
    import gguf

    out = tmp_path / f"m-{quant}.gguf"
    r = export(silu_ckpt, "gguf", out, quant=quant, probe_text=probe, log=_quiet)
    ag = r["agreement"]
    assert ag.ok, str(ag)
    assert ag.tokenization.startswith("identical"), ag.tokenization
    if quant == "f32":
        assert ag.emulated_rel < 1e-3  # F32: the same function as our ternary weights, fp activations
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "bitnet"
    assert bytes(fields["bitnet.hidden_activation"].parts[-1]).decode() == "silu"
    assert "tokenizer.ggml.merges" in fields and "tokenizer.chat_template" in fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "{% generation %}" not in template and "endgeneration" not in template and "assistant" in template
    tensors = {t.name: t for t in reader.tensors}
    want = gguf.GGMLQuantizationType[quant.upper()]
    assert tensors["blk.0.ffn_down.weight"].tensor_type == want
    assert tensors["blk.1.attn_q.scale"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in tensors
    # the stored codes and scale are exactly quant.weight_quant's
    from safetensors import safe_open

    from bitnet_train.quant import weight_quant

    with safe_open(str(silu_ckpt / "model.safetensors"), "pt") as f:
        codes, s = weight_quant(f.get_tensor("model.layers.0.self_attn.o_proj.weight"))
    t = tensors["blk.0.attn_output.weight"]
    vals = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(codes.shape)
    assert np.array_equal(vals, codes.numpy().astype(np.float32))
    assert float(tensors["blk.0.attn_output.scale"].data[0]) == pytest.approx(float(s), rel=1e-7)


@pytest.mark.llama
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_dropped_scales_fail_verification(silu_ckpt, probe, tmp_path, monkeypatch):
    """The check must catch a wrong export: scales written as 1.0 fail and leave no file."""
    real = G._encode

    def no_scales(src, key, kind, storage, scales):
        arr = real(src, key, kind, storage, scales)
        return np.ones_like(arr) if kind == "scale" else arr

    monkeypatch.setattr(G, "_encode", no_scales)
    out = tmp_path / "bad.gguf"
    with pytest.raises(ExportError, match="verification failed"):
        export(silu_ckpt, "gguf", out, quant="tq2_0", probe_text=probe, log=_quiet)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_relu2_model_refused(relu2_ckpt, tmp_path):
    out = tmp_path / "r.gguf"
    with pytest.raises(ExportError, match=r"hidden_act is 'relu2'.*SiLU"):
        export(relu2_ckpt, "gguf", out, quant="tq2_0", log=_quiet)
    assert not out.exists()


@pytest.mark.llama
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_relu2_forced_is_written_but_fails_verification(relu2_ckpt, probe, tmp_path):
    out = tmp_path / "r.gguf"
    logs = []
    r = export(relu2_ckpt, "gguf", out, quant="f32", force=True, probe_text=probe, log=logs.append)
    ag = r["agreement"]
    assert out.is_file() and r["ok"] is False
    # barely trained, the ReLU² FFN changes the logits little (1.4e-2, top-1 100% measured): the
    # tight F32 check is what catches it — and why the exporter refuses on the config first
    assert not ag.ok and ag.emulated_rel > 3 * ag.max_emulated_rel, str(ag)
    assert any("relu2" in line for line in logs)


def test_untied_head_refused(tmp_path, text):
    ck = make_checkpoint(tmp_path / "untied", text, steps=0, tie_word_embeddings=False)
    with pytest.raises(ExportError, match="untied"):
        export(ck, "gguf", tmp_path / "u.gguf", quant="f32", log=_quiet)


def test_tq_shape_not_packable(tmp_path):
    """`tiny` has intermediate_size 704: ffn_down rows are not multiples of 256."""
    ck = make_checkpoint(tmp_path / "ck", "ab " * 5000, steps=0, intermediate_size=704)
    out = tmp_path / "t.gguf"
    with pytest.raises(ExportError, match=r"mlp\.down_proj\.weight.*704.*multiple of 256.*--tq-fallback"):
        export(ck, "gguf", out, quant="tq1_0", log=_quiet)
    assert not out.exists()
    rows = G.plan(G.CheckpointSource(ck), "tq1_0", tq_fallback="f16")
    storage = {name: st for name, _k, kind, st in rows if kind == "ternary"}
    assert storage["blk.0.ffn_down.weight"] == "f16" and storage["blk.0.ffn_up.weight"] == "tq1_0"


@pytest.mark.llama
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_killed_export_leaves_nothing_complete(silu_ckpt, tmp_path):
    out = tmp_path / "k.gguf"
    cmd = [sys.executable, "-m", "bitnet_train.cli", "export", str(silu_ckpt), "--format", "gguf", "--quant", "f32",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any(p.name.startswith(".k.gguf.tmp-") for p in tmp_path.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the export finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".") and ".tmp-" in p.name for p in leftovers)
    # the next export cleans the leftover and succeeds
    export(silu_ckpt, "gguf", out, quant="f32", verify=False, log=_quiet)
    assert [p.name for p in tmp_path.iterdir()] == ["k.gguf"]


@pytest.mark.llama
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_generate_cli(silu_ckpt, tmp_path, capsys):
    from bitnet_train.cli import main

    out = tmp_path / "g.gguf"
    export(silu_ckpt, "gguf", out, quant="tq2_0", verify=False, log=_quiet)
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:") and "[llama.cpp]" in printed and "tokens/s" in printed


def test_cli_errors(silu_ckpt, tmp_path, capsys):
    from bitnet_train.cli import main

    assert main(["export", str(tmp_path / "nope"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["export", str(silu_ckpt), "--format", "hf", "--quant", "tq2_0", "--out", str(tmp_path / "h")]) == 2
    assert "--quant applies to --format gguf" in capsys.readouterr().err
    assert main(["export", str(silu_ckpt), "--format", "gguf", "--quant", "i2_s", "--out", str(tmp_path / "i.gguf")]) == 2
    assert "i2_s (bitnet.cpp) is not implemented" in capsys.readouterr().err
    assert not (tmp_path / "i.gguf").exists()
