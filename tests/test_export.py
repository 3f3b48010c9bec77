"""Exports into the runtimes that run them: stock transformers (hf) and llama.cpp (gguf).

The models are tiny BitNets trained for a few steps on tinyshakespeare (a random init has
near-uniform logits, which makes top-1 agreement meaningless), probed on held-out text.
"""

from __future__ import annotations

import json
import math
import os
import re
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
from bitnet_train.runtimes import LlamaCpp, StockTransformers

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except Exception:  # noqa: BLE001
    HAVE_LLAMA = False

REPO = Path(__file__).resolve().parents[1]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def make_checkpoint(out: Path, text: str, preset="tiny-silu", steps=40, seed=0, train_end=250_000, **over) -> Path:
    """A 2-layer hidden-256 BitNet with a 512-token byte-level BPE, trained ``steps`` steps on
    ``text[:train_end]`` (also used by scripts/bench_tolerances.py)."""
    from bitnet_train.checkpoint.format import save_checkpoint
    from bitnet_train.modeling.models import build_model
    from bitnet_train.data.tokenizer import train_bpe

    train = text[:train_end]  # the probe (below) comes from the rest: held out
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

    return _text(SHAKESPEARE)  # shipped under tests/data


@pytest.fixture(scope="module")
def probe(text):
    return text[-3_000:]  # held out: training uses the first 250k characters of the ~300k shipped


@pytest.fixture(scope="module")
def silu_ckpt(tmp_path_factory, text):
    return make_checkpoint(tmp_path_factory.mktemp("silu") / "ckpt", text)


@pytest.fixture(scope="module")
def relu2_ckpt(tmp_path_factory, text):
    return make_checkpoint(tmp_path_factory.mktemp("relu2") / "ckpt", text, preset="tiny", steps=10, tie_word_embeddings=True)


def _llama_logits(path, ids):
    with LlamaCpp(path, n_ctx=max(64, len(ids) + 8), all_logits=True) as rt:
        return rt.logits(ids)


def _quiet(*_a, **_k):
    pass


def hand_perplexity(logits, ids: list[int]) -> float:
    """exp(mean cross-entropy) of ``ids[1:]`` from ``logits[:-1]``, in torch float64: independent of
    verify's numpy log-softmax."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)[:-1]
    return math.exp(float(torch.nn.functional.cross_entropy(x, torch.tensor(ids[1:]))))


def probe_ids_of(ckpt: Path, probe: str, n: int = 128) -> list[int]:
    """The probe tokens export feeds both sides (the checkpoint's tokenizer, as export loads it)."""
    from bitnet_train.export.source import CheckpointSource, load_tokenizer_for

    return V.probe_ids(load_tokenizer_for(CheckpointSource(ckpt), None), probe, n)


# the probe perplexities in the report line (verify.Agreement.__str__)
PPL_REPORT = re.compile(r"probe perplexity ours ([0-9.]+), runtime ([0-9.]+) \(relative difference ([0-9.e+-]+)\)")


def reported_perplexities(line: str) -> tuple[float, float, float]:
    m = PPL_REPORT.search(line)
    assert m, f"no probe perplexity in the report: {line}"
    return tuple(float(g) for g in m.groups())


# ---------------------------------------------------------------------------------------------
# hf: stock transformers
# ---------------------------------------------------------------------------------------------


def test_hf_export_into_stock_transformers(silu_ckpt, probe, tmp_path):
    from safetensors import safe_open

    from bitnet_train.quant import unpack_hf, weight_quant

    out = tmp_path / "hf"
    logs = []
    r = export(silu_ckpt, "hf", out, probe_text=probe, log=logs.append)
    ag = r["agreement"]
    assert ag.ok and ag.rel_error < 1e-3 and ag.top1 == 1.0, str(ag)
    # the probe's perplexity in both, each from its own logits, reported beside the logit error
    ids = probe_ids_of(silu_ckpt, probe)
    assert ag.positions == len(ids)
    assert ag.ppl_ours == pytest.approx(hand_perplexity(V.our_logits(silu_ckpt, ids), ids), rel=1e-9)
    assert ag.ppl_runtime == pytest.approx(hand_perplexity(StockTransformers(out).logits(ids), ids), rel=1e-9)
    print(ag)  # the report line (docs/eval.md's table: pytest -s)
    assert 1.0 < ag.ppl_ours < 512 and ag.ppl_rel < 1e-4, str(ag)  # measured: 1.6e-9 (docs/eval.md)
    ours, theirs, rel = reported_perplexities(next(line for line in logs if line.startswith("verify [hf]")))
    assert ours == pytest.approx(ag.ppl_ours, abs=1e-4) and theirs == pytest.approx(ag.ppl_runtime, abs=1e-4)
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
                         env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])  # the repository root, as a user's shell
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
    assert r["runtime"] == "llama.cpp" and r["quant"] == quant
    ids = probe_ids_of(silu_ckpt, probe)
    assert ag.positions == len(ids)
    theirs = _llama_logits(out, ids)
    assert ag.ppl_runtime == pytest.approx(hand_perplexity(theirs, ids), rel=1e-6)
    assert ag.ppl_ours == pytest.approx(hand_perplexity(V.our_logits(silu_ckpt, ids), ids), rel=1e-9)
    print(ag)
    assert ag.ppl_rel < 2e-3, str(ag)  # measured: TQ2_0/TQ1_0 5.5e-6, F32 1.5e-4 (docs/eval.md)
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


@pytest.mark.parametrize("embed_type,ggml_type", [("q8_0", 8), ("q6_k", 14)])
@pytest.mark.llama
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_embedding_types(silu_ckpt, probe, tmp_path, embed_type, ggml_type):
    """``--embed-type``: token_embd (the tied head too) stored by ggml's quantizer, read back by llama.cpp as
    the emulation reads it. Measured on this model (Q2_0 weights): against the emulation 2.9e-4 with
    either type; the same emulation with an F16 embedding is 2e-3 from the file (the embedding's
    rounding is what it models)."""
    from bitnet_train.runtimes.gguf_header import read_header

    out = tmp_path / f"m-{embed_type}.gguf"
    r = export(silu_ckpt, "gguf", out, quant="q2_0", embed_type=embed_type, probe_text=probe, log=_quiet)
    ag = r["agreement"]
    assert ag.ok and ag.emulated_rel < 1e-3, str(ag)
    assert r["embed_type"] == embed_type and r["output_type"] is None
    types = {name: t for name, _d, t in read_header(out)[1]}
    assert types["token_embd.weight"] == ggml_type and "output.weight" not in types
    f16 = tmp_path / "m-f16.gguf"
    export(silu_ckpt, "gguf", f16, quant="q2_0", embed_type="f16", probe_text=probe, verify=False, log=_quiet)
    assert out.stat().st_size < f16.stat().st_size
    ids = probe_ids_of(silu_ckpt, probe)
    theirs = _llama_logits(out, ids)
    as_f16 = V.rel_error(theirs, V.emulated_logits(silu_ckpt, ids, "q2_0", "f16"))
    assert as_f16 > 3 * ag.emulated_rel, (as_f16, ag.emulated_rel)


def test_embedding_type_rows_refused_before_writing(silu_ckpt, tmp_path, monkeypatch):
    from bitnet_train.export.source import CheckpointSource

    shape = CheckpointSource.shape
    monkeypatch.setattr(CheckpointSource, "shape", lambda self, key: (
        (4096, 288) if key == "model.embed_tokens.weight" else shape(self, key)))
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match=r"--embed-type q6_k: tensor 'model.embed_tokens.weight' has rows of 288 "
                                          r"values, not a multiple of 256 .*f32, f16, q8_0 take it; nothing written"):
        export(silu_ckpt, "gguf", out, quant="tq2_0", embed_type="q6_k", log=_quiet)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="--embed-type/--output-type apply to --format gguf only"):
        export(silu_ckpt, "hf", tmp_path / "hf", embed_type="q8_0", log=_quiet)


@pytest.mark.llama
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_dropped_scales_fail_verification(tmp_path_factory, text, probe, tmp_path, monkeypatch):
    """The check must catch a wrong export: scales written as 1.0 fail and leave no file.

    On a model whose layers matter. Measured (TQ2_0, this probe): after 40 training steps the logits
    are mostly the embedding's unigram guess and dropping every scale moves them by only 3.5e-2 (inside
    the 5e-2 tolerance, top-1 still 100%); after 100 steps 5.1e-2 (86.7%); after 200 steps 1.1e-1
    (71.9%), while the correct export of that model is at 2.8e-3. The probe perplexity is blunter: 63.27
    ours, 63.25 correct (4.3e-4 relative), 64.76 with the scales dropped (2.3e-2, 55x the correct one)."""
    silu_ckpt = make_checkpoint(tmp_path_factory.mktemp("silu200") / "ckpt", text, steps=200)
    good = export(silu_ckpt, "gguf", tmp_path_factory.mktemp("good") / "good.gguf", quant="tq2_0", probe_text=probe,
                  log=_quiet)["agreement"]
    real = G._encode

    def no_scales(src, key, kind, storage, scales, *rest):
        arr = real(src, key, kind, storage, scales, *rest)
        return np.ones_like(arr) if kind == "scale" else arr

    monkeypatch.setattr(G, "_encode", no_scales)
    out = tmp_path / "bad.gguf"
    with pytest.raises(ExportError, match="verification failed") as e:
        export(silu_ckpt, "gguf", out, quant="tq2_0", probe_text=probe, log=_quiet)
    assert not out.exists() and not list(tmp_path.iterdir())
    print(f"{good}\n{e.value}")
    ours, theirs, rel = reported_perplexities(str(e.value))  # the failure names both perplexities too
    assert rel == pytest.approx(abs(theirs / ours - 1), abs=1e-3) and ours == pytest.approx(good.ppl_ours, abs=1e-4)
    assert rel > 5 * good.ppl_rel, (str(e.value), str(good))


def test_sensitive_models_are_held_to_their_sensitivity():
    """The gate: the format's tolerances for a model whose logits float activations move little; for one
    they move a lot (a deep model barely trained: SmolLM2 after 30 steps, docs/runtimes.md), twice that
    movement, with top-1 and the emulation reported. Formats whose runtime quantizes activations as we do
    take no allowance."""
    from bitnet_train.export.formats import find

    rng = np.random.default_rng(0)
    ours = rng.normal(size=(16, 32))
    ours_float = ours + 0.1 * np.linalg.norm(ours) / np.sqrt(ours.size) * rng.normal(size=ours.shape)
    s = V.rel_error(ours_float, ours)
    assert 0.09 < s < 0.11
    q2 = find("q2_0")
    for scale, ok in ((1.5, True), (2.5, False)):  # a runtime 1.5x / 2.5x as far from ours as float activations
        theirs = ours + scale * (ours_float - ours)
        ag = V.compare(q2, theirs, ours, ours_emulated=ours + 9.0, ours_float=ours_float)
        assert ag.sensitive and ag.allowed_rel == pytest.approx(2 * s) and ag.ok is ok, str(ag)
        assert "reported" in str(ag) and f"{2 * s:.1e}" in str(ag)
    calm = ours + 0.001 * (ours_float - ours) / 0.1  # float activations move it 1e-3: the fixed tolerances
    theirs = ours + 0.01 * (ours_float - ours) / 0.1
    ag = V.compare(q2, theirs, ours, ours_emulated=theirs, ours_float=calm)
    assert not ag.sensitive and ag.allowed_rel == q2.tolerance.max_rel and ag.ok, str(ag)
    assert not V.compare(q2, theirs, ours, ours_emulated=ours + 9.0, ours_float=calm).ok  # the emulation gates
    hf = find("hf")
    assert not V.compare(hf, ours_float, ours, ours_float=None).ok  # no allowance where activations are ours


def test_top1_counts_the_positions_not_near_a_tie():
    """Top-1 agreement is over the positions where our top logit leads the runner-up by more than the
    format's tolerance could move it (a barely trained student has many near ties, and an error within the
    tolerance may pick either token); a runtime that changes the choice where it is clear still fails."""
    from bitnet_train.export.formats import find

    q2 = find("q2_0")
    rng = np.random.default_rng(0)
    ours = rng.normal(size=(40, 1000))
    top = ours.max(-1)
    for i in range(40):  # rows 0-19: a clear winner (margin 0.6); rows 20-39: two tokens tied
        ours[i, i] = top[i] + (0.6 if i < 20 else 0.0)
        if i >= 20:
            ours[i, i + 1] = ours[i, i]
    keep = V.decisive_positions(ours, q2.tolerance.max_rel)
    assert keep[:20].all() and not keep[20:].any()
    theirs = ours + 1e-3 * rng.normal(size=ours.shape)
    for i in range(20, 40):  # the ties go either way
        theirs[i, i + 1] += 1e-2 if i % 2 else -1e-2
    ag = V.compare(q2, theirs, ours, ours_emulated=theirs)
    assert np.mean(theirs.argmax(-1) == ours.argmax(-1)) < 0.9  # over every position it would fail
    assert ag.ok and ag.top1 == 1.0 and ag.decisive == 20, str(ag)
    assert "over the 20 of 40 positions not near a tie" in str(ag)
    wrong = theirs.copy()
    for i in range(5):  # five clear choices changed: a small error overall, caught by top-1 alone
        wrong[i, 500] = ours[i, i] + 0.1
    ag = V.compare(q2, wrong, ours, ours_emulated=wrong)
    assert ag.rel_error < q2.tolerance.max_rel and ag.top1 == 0.75 and not ag.ok, str(ag)


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
    r = export(relu2_ckpt, "gguf", out, quant="f32", runtime="llama.cpp", force=True, probe_text=probe,
               log=logs.append)
    ag = r["agreement"]
    assert out.is_file() and r["ok"] is False
    # barely trained, the ReLU² FFN changes the logits little (1.4e-2, top-1 100% measured): the
    # tight F32 check is what catches it — and why the exporter refuses on the config first
    assert not ag.ok and ag.emulated_rel > 3 * ag.max_emulated_rel, str(ag)
    print(ag)
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


def test_silu_presets_pack_without_fallback():
    """Every preset offered for llama.cpp/bitnet.cpp has rows TQ (256) and I2_S (128 / 64) pack."""
    from bitnet_train.export.formats import TQ_BLOCK
    from bitnet_train.modeling.models import list_presets, load_preset

    silu = [n for n in list_presets() if n.endswith("-silu")]
    assert "tiny-silu" in silu and "2b4t-silu" in silu
    for n in silu:
        c = load_preset(n)
        for block in (TQ_BLOCK, *G.I2S_LAYOUTS.values()):
            assert c["hidden_size"] % block == 0 and c["intermediate_size"] % block == 0, (n, block)


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
    # a temporary, and the lock file of the killed export (the system released its lock with the process)
    assert all(p.name.startswith(".") and ".tmp-" in p.name or p.name == ".k.gguf.lock" for p in leftovers)
    # the next export takes the lock over, cleans the leftovers and succeeds
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


def test_checkpoint_generation_reuses_the_kv_cache(silu_ckpt):
    """Greedy decoding of a checkpoint (our forward) hands the KV cache back under the argument this
    transformers names (no deprecated one: its removal would break decoding) and picks the tokens a
    full forward over the whole sequence picks at every step."""
    import warnings

    import torch

    from bitnet_train.runtimes.generate import open_runtime

    with open_runtime(silu_ckpt, threads=2) as rt, warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        got = rt.complete("ROMEO:", 10, 0.0, chat=False)
        ids = rt.tokenize("ROMEO:", add_bos=True)
        new = []
        with torch.no_grad():
            for _ in range(got["new_tokens"]):
                nxt = int(rt.model(torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(nxt)
    assert got["runtime"] == "bitnet-train" and got["new_tokens"] == 10, got
    assert got["text"] == rt.tok.decode(new), (got["text"], rt.tok.decode(new))


def test_cli_progress_bar(silu_ckpt, tmp_path, capsys):
    from bitnet_train.cli import main

    n = len(G.plan(G.CheckpointSource(silu_ckpt), "f16"))
    assert main(["export", str(silu_ckpt), "--format", "gguf", "--quant", "f16", "--no-verify",
                 "--out", str(tmp_path / "p.gguf")]) == 0
    err = capsys.readouterr().err
    assert "export gguf/f16" in err and f"{n}/{n}" in err and "tensor" in err
    assert main(["export", str(silu_ckpt), "--format", "gguf", "--quant", "f16", "--no-verify", "--no-progress",
                 "--out", str(tmp_path / "q.gguf")]) == 0
    assert "export gguf/f16" not in capsys.readouterr().err


@pytest.mark.llama
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_cli_json_report(silu_ckpt, probe, tmp_path, capsys):
    """``export --json``: one JSON object on stdout with the verification figures, the report on stderr;
    the probe perplexities are each side's own (recomputed here from the runtime's and our logits)."""
    from bitnet_train.cli import main

    pf, out = tmp_path / "probe.txt", tmp_path / "m.gguf"
    pf.write_text(probe, encoding="utf-8")
    assert main(["export", str(silu_ckpt), "--format", "gguf", "--out", str(out), "--probe-file", str(pf),
                 "--json", "--no-progress"]) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    assert (r["ok"], r["verified"], r["quant"], r["runtime"], r["path"]) == (True, True, "tq2_0", "llama.cpp", str(out))
    ag = r["agreement"]
    assert ag["ok"] and ag["fmt"] == "tq2_0" and ag["rel_error"] <= ag["max_rel"]
    ids = probe_ids_of(silu_ckpt, probe)
    assert ag["positions"] == len(ids)
    assert ag["ppl_runtime"] == pytest.approx(hand_perplexity(_llama_logits(out, ids), ids), rel=1e-6)
    assert ag["ppl_ours"] == pytest.approx(hand_perplexity(V.our_logits(silu_ckpt, ids), ids), rel=1e-9)
    assert ag["ppl_rel"] == pytest.approx(abs(ag["ppl_runtime"] / ag["ppl_ours"] - 1), rel=1e-9)
    line = next(x for x in cap.err.splitlines() if x.startswith("verify [tq2_0] OK"))
    assert reported_perplexities(line)[0] == pytest.approx(ag["ppl_ours"], abs=1e-4)
    assert main(["export", str(silu_ckpt), "--format", "hf", "--out", str(tmp_path / "h"), "--no-verify", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["ok"], r["verified"], r["agreement"], r["runtime"]) == (True, False, None, "transformers")


def test_cli_errors(silu_ckpt, tmp_path, capsys):
    from bitnet_train.cli import main

    assert main(["export", str(tmp_path / "nope"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["export", str(silu_ckpt), "--format", "hf", "--quant", "tq2_0", "--out", str(tmp_path / "h")]) == 2
    assert "--quant applies to --format gguf" in capsys.readouterr().err
    assert main(["export", str(silu_ckpt), "--format", "gguf", "--quant", "f16", "--tq-fallback", "f16",
                 "--out", str(tmp_path / "i.gguf")]) == 2
    assert "--tq-fallback applies to --quant tq2_0/tq1_0/q2_0/i2_s only" in capsys.readouterr().err
    assert not (tmp_path / "i.gguf").exists()


# ---------------------------------------------------------------------------------------------
# gguf i2_s: bitnet.cpp
# ---------------------------------------------------------------------------------------------


def _bitnet_cpp_quantize_i2_s(q: np.ndarray, block: int) -> bytes:
    """bitnet.cpp's quantize_i2_s packing loop (src/ggml-bitnet-mad.cpp), transcribed as it is:
    ``q`` holds the codes + 1 of the flattened tensor."""
    group = block // 4
    out = bytearray(q.size // 4)
    for i in range(q.size // block):
        for j in range(block):
            out[i * group + j % group] |= int(q[i * block + j]) << (6 - 2 * (j // group))
    return bytes(out)


@pytest.mark.parametrize("layout", ["x86", "arm"])
def test_i2s_packing_is_bitnet_cpps(layout):
    block = G.I2S_LAYOUTS[layout]
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(6, 2 * block)).astype(np.int8)
    data = G.pack_i2s(codes, 0.0421, block)
    n = codes.size
    assert data.dtype == np.uint8 and data.size == n // 4 + 32
    assert data[: n // 4].tobytes() == _bitnet_cpp_quantize_i2_s(codes.reshape(-1) + 1, block)
    assert np.frombuffer(data[n // 4 : n // 4 + 4].tobytes(), np.float32)[0] == np.float32(0.0421)
    assert not data[n // 4 + 4 :].any()
    back, scale = G.unpack_i2s(data, codes.shape, block)
    assert np.array_equal(back, codes) and scale == pytest.approx(0.0421, rel=1e-7)
    # worked by hand from the loop: all zeros (code 1 = 0b01) but value 0 = +1 (0b10, top bits of
    # byte 0) and value group+1 = -1 (0b00, second bit pair of byte 1)
    one = np.zeros((1, block), np.int8)
    one[0, 0], one[0, block // 4 + 1] = 1, -1
    packed = G.pack_i2s(one, 1.0, block)
    assert packed[0] == 0b10_01_01_01 and packed[1] == 0b01_00_01_01 and set(packed[2 : block // 4]) == {0x55}


def _read_gguf(path: Path) -> tuple[dict, dict, int]:
    """A minimal GGUF v3 reader for the test (the gguf package's reader stops at type 36):
    (metadata, {name: (dims, type, offset)}, data start)."""
    import struct

    buf = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n : pos].decode("utf-8")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(scalar[t])

    assert buf[:4] == b"GGUF" and take("4s") and take("I") == 3
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        k = string()
        meta[k] = value(take("I"))
    infos = {}
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos[name] = (dims, take("I"), take("Q"))
    align = meta.get("general.alignment", 32)
    return meta, infos, (pos + align - 1) // align * align


def test_i2s_export_layout(silu_ckpt, tmp_path, monkeypatch):
    """The file bitnet.cpp reads: type 36 tensors of n/4 + 32 bytes holding our exact codes and
    scale (no .scale tensors), Q8_0 token_embd, file type 40. Without a bitnet.cpp build the
    export says it was not checked there."""
    from bitnet_train.export.source import CheckpointSource
    from bitnet_train.runtimes.gguf_header import summary

    monkeypatch.delenv("BITNET_CPP_DIR", raising=False)
    out = tmp_path / "m.gguf"
    logs = []
    r = export(silu_ckpt, "gguf", out, quant="i2_s", log=logs.append)
    assert r["agreement"] is None and any("NOT checked in bitnet.cpp" in line for line in logs)
    meta, infos, start = _read_gguf(out)
    assert meta["general.architecture"] == "bitnet" and meta["general.file_type"] == 40
    assert summary(out)["file_type"] == 40
    assert "tokenizer.ggml.merges" in meta and meta["bitnet.hidden_activation"] == "silu"
    assert not [n for n in infos if n.endswith(".scale")]
    assert infos["token_embd.weight"][1] == 8  # Q8_0, the default beside ternary weights
    src = CheckpointSource(silu_ckpt)
    buf = out.read_bytes()
    ends = []
    for key in src.ternary_modules:
        name = G.gguf_name(key + ".weight")
        dims, typ, off = infos[name]
        codes, s = src.ternary(key + ".weight")
        assert typ == G.I2S_TYPE and dims == [codes.shape[1], codes.shape[0]] and off % 32 == 0, name
        n = codes.numel()
        data = np.frombuffer(buf, np.uint8, count=n // 4 + 32, offset=start + off)
        got, scale = G.unpack_i2s(data, tuple(codes.shape))
        assert np.array_equal(got, codes.numpy()), name
        assert scale == pytest.approx(float(s), rel=1e-7)
        ends.append((off, off + n // 4 + 32))
    ends.sort()
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # no tensor overlaps the next


def test_i2s_block_not_packable(tmp_path):
    ck = make_checkpoint(tmp_path / "ck", "ab " * 5000, steps=0, intermediate_size=704)
    with pytest.raises(ExportError, match=r"mlp\.down_proj\.weight.*704.*multiple of 128.*I2_S"):
        export(ck, "gguf", tmp_path / "i.gguf", quant="i2_s", verify=False, log=_quiet)
    rows = G.plan(G.CheckpointSource(ck), "i2_s", tq_fallback="f16")
    storage = {name: st for name, _k, kind, st in rows if kind == "ternary"}
    scales = {name for name, _k, kind, _st in rows if kind == "scale"}
    assert storage["blk.0.ffn_down.weight"] == "f16" and storage["blk.0.ffn_up.weight"] == "i2_s"
    assert scales == {"blk.0.ffn_down.scale", "blk.1.ffn_down.scale"}  # only the F16 fallback needs one


def test_i2s_generate_points_to_bitnet_cpp(silu_ckpt, tmp_path, capsys, monkeypatch):
    from bitnet_train.cli import main

    monkeypatch.delenv("BITNET_CPP_DIR", raising=False)
    out = tmp_path / "g.gguf"
    export(silu_ckpt, "gguf", out, quant="i2_s", verify=False, log=_quiet)
    assert main(["generate", str(out), "--prompt", "ROMEO:"]) == 2
    err = capsys.readouterr().err
    assert "I2_S GGUF, which only bitnet.cpp runs" in err and "--bitnet-cpp DIR" in err


BITNET_CPP = os.environ.get("BITNET_CPP_DIR")


@pytest.mark.skipif(not BITNET_CPP, reason="no bitnet.cpp build (set BITNET_CPP_DIR to a built checkout)")
def test_i2s_into_bitnet_cpp(silu_ckpt, probe, tmp_path, monkeypatch):
    """The real round trip, when a bitnet.cpp build is at hand: logits agree, and a wrong packing
    or a dropped scale fails verification and leaves nothing."""
    out = tmp_path / "m.gguf"
    r = export(silu_ckpt, "gguf", out, quant="i2_s", probe_text=probe, bitnet_cpp=BITNET_CPP, log=_quiet)
    ag = r["agreement"]
    assert ag is not None and ag.ok and ag.rel_error < 5e-3 and ag.top1 >= 0.99, str(ag)
    assert ag.tokenization.startswith("identical"), ag.tokenization  # the GGUF's tokenizer in bitnet.cpp
    assert ag.ppl_rel < 1e-2, str(ag)  # the probe perplexity in both (measured in llama.cpp: docs/eval.md)
    # bitnet.cpp's AVX2 dot product has a loop over groups of 32 blocks (4,096 values) and a tail
    # loop; rows of 256 and 768 reach only the tail, an FFN of 4352 (34 blocks) both
    wide = make_checkpoint(tmp_path / "wide", probe * 100, steps=20, intermediate_size=4352)
    ag = export(wide, "gguf", tmp_path / "w.gguf", quant="i2_s", probe_text=probe, bitnet_cpp=BITNET_CPP,
                log=_quiet)["agreement"]
    assert ag is not None and ag.ok and ag.rel_error < 5e-3 and ag.top1 >= 0.99, str(ag)
    # generate runs the file in bitnet.cpp's llama-cli: greedy, it continues as our model does
    from bitnet_train.runtimes.generate import generate

    theirs = generate(out, "ROMEO:", 8, threads=2, bitnet_cpp=BITNET_CPP)
    ours = generate(silu_ckpt, "ROMEO:", 8, threads=2)
    assert theirs["runtime"] == "bitnet.cpp" and theirs["new_tokens"] == 8 and theirs["tokens_per_s"] > 0
    assert theirs["text"] == ours["text"]
    real = G.pack_i2s
    for wrong in (lambda c, s, b: real(c, 1.0, b), lambda c, s, b: real(c, s, b // 2)):
        monkeypatch.setattr(G, "pack_i2s", wrong)
        bad = tmp_path / "bad.gguf"
        with pytest.raises(ExportError, match="verification failed"):
            export(silu_ckpt, "gguf", bad, quant="i2_s", probe_text=probe, bitnet_cpp=BITNET_CPP, log=_quiet)
        assert not bad.exists()
