"""Converting Hugging Face models to ternary: every architecture of the matrix round-trips
through save and load (ours and stock transformers), unconvertible models get an error naming the
module, and on tinyshakespeare a tiny Llama and a tiny Qwen2 trained in full precision with our loop
recover after conversion with the quantization warm-up. Tiny models built in the test: no download."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bitnet_train import cli
from bitnet_train.layers.bitlinear import BitLinear, bitlinear_modules, convert_to_bitlinear
from bitnet_train.checkpoint.format import load_checkpoint
from bitnet_train.modeling.convert import convert_hf, convert_model, load_hf_converted
from bitnet_train.modeling.models import ModelSpecError, load_model
from bitnet_train.recipe import RecipeError
from bitnet_train.data.tokenizer import train_bpe
from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

REPO = Path(__file__).resolve().parents[1]
from conftest import SHAKESPEARE  # noqa: E402
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: one intra-op thread is as fast, and far faster on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tok()


def tiny_config(arch: str, tok):
    import transformers as tf

    # a few spare embedding rows, as real checkpoints have (and transformers 5 gives a Qwen2 tokenizer
    # loaded from a model directory one extra special token)
    ids = dict(vocab_size=len(tok) + 16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "llama":
        return tf.LlamaConfig(**DIMS, **ids, tie_word_embeddings=False, rope_theta=10000.0)
    if arch == "qwen2":  # q/k/v with biases
        return tf.Qwen2Config(**DIMS, **ids, tie_word_embeddings=False)
    if arch == "qwen3":  # q/k norms
        return tf.Qwen3Config(**DIMS, **ids, head_dim=16, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**DIMS, **ids, sliding_window=None, tie_word_embeddings=False)
    if arch == "gemma":  # tied embeddings, GELU MLP
        return tf.GemmaConfig(**DIMS, **ids, head_dim=16, tie_word_embeddings=True)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**DIMS, **ids, tie_word_embeddings=False)
    raise KeyError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"]


def save_tiny(arch: str, tok, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, tok)).float()
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


STOCK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    res = {}
    for ckpt in sys.argv[3:]:
        m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        assert "bitnet_train" not in sys.modules
        with torch.no_grad():
            res[ckpt] = {"logits": m(torch.load(sys.argv[1])).logits,
                         "classes": sorted(type(x).__name__ for x in m.modules() if isinstance(x, torch.nn.Linear)),
                         "rms": sum(getattr(x, "rms_norm", None) is not None for x in m.modules())}
    torch.save(res, sys.argv[2])
    """
)


def stock_logits(ckpts, ids, tmp: Path) -> dict:
    """Stock transformers (bitnet_train not imported, eager: TORCHDYNAMO_DISABLE) on each checkpoint."""
    torch.save(ids, tmp / "ids.pt")
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    subprocess.run([sys.executable, "-P", "-c", STOCK_SCRIPT, str(tmp / "ids.pt"), str(tmp / "stock.pt"),
                    *map(str, ckpts)], check=True, env=env, cwd=tmp)
    return torch.load(tmp / "stock.pt")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- the matrix


def test_every_architecture_roundtrips(tok, tmp_path):
    ids = torch.randint(0, len(tok), (2, 20))
    ours, ckpts = {}, []
    for i, arch in enumerate(ARCHS):
        src = save_tiny(arch, tok, tmp_path / f"{arch}-hf", seed=i)
        rms = arch in ("llama", "gemma")  # the optional input RMSNorm, on a tied and an untied model
        s = convert_hf(str(src), tmp_path / arch, use_rms_norm=rms, rms_norm_eps=1e-5 if arch == "gemma" else None)
        n_linear = 7 * DIMS["num_hidden_layers"] if arch != "phi3" else 4 * DIMS["num_hidden_layers"]
        assert len(s["converted"]) == n_linear, (arch, s["converted"])
        assert s["full_precision_linear"] == ["lm_head"], arch
        qc = json.loads((tmp_path / arch / "config.json").read_text())["quantization_config"]
        assert (qc["quant_method"], qc["linear_class"], qc["quantization_mode"]) == ("bitnet", "autobitlinear", "online")
        assert qc["use_rms_norm"] is rms and qc["modules_to_not_convert"] == ["lm_head"]
        # our loader: BitLinear in the same places, and the same logits as converting in memory
        m = load_checkpoint(tmp_path / arch).eval()
        ref = load_hf_converted(str(src), use_rms_norm=rms, rms_norm_eps=1e-5 if arch == "gemma" else None).eval()
        assert [n for n, _ in bitlinear_modules(m)] == s["converted"]
        assert type(m.lm_head) is nn.Linear and not isinstance(m.get_input_embeddings(), BitLinear)
        if arch == "gemma":
            assert m.lm_head.weight is m.get_input_embeddings().weight  # the tie survives the round trip
        first = bitlinear_modules(m)[0][1]
        assert (first.rms_norm is not None) is rms
        if rms:
            assert first.rms_norm.variance_epsilon == (1e-5 if arch == "gemma" else tiny_config(arch, tok).rms_norm_eps)
            with torch.no_grad():  # make the norm weights non-trivial so that loading them is checked
                for _, b in bitlinear_modules(m):
                    b.rms_norm.weight.uniform_(0.5, 1.5)
            from bitnet_train.checkpoint.format import save_checkpoint

            save_checkpoint(m, tmp_path / arch)
            ref = load_checkpoint(tmp_path / arch).eval()
        with torch.no_grad():
            ours[arch] = m(ids).logits
            assert torch.equal(ours[arch], ref(ids).logits), arch
        ckpts.append(tmp_path / arch)
    stock = stock_logits(ckpts, ids, tmp_path)
    for arch, ck in zip(ARCHS, ckpts):
        out = stock[str(ck)]
        assert out["classes"].count("Linear") == 1 and "AutoBitLinear" in out["classes"], (arch, out["classes"])
        assert out["rms"] == (len(out["classes"]) - 1 if arch in ("llama", "gemma") else 0), arch
        assert rel(ours[arch], out["logits"]) < 1e-5, (arch, rel(ours[arch], out["logits"]))


# ----------------------------------------------------------------------------- errors


def test_unconvertible_models_name_the_module(tok, tmp_path):
    import transformers as tf

    # GPT-2 computes with Conv1D, not nn.Linear: nothing to convert but its (tied) head
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelSpecError, match=r"hf:.*gpt2.*GPT2LMHeadModel.*no eligible nn.Linear"):
        load_hf_converted(str(tmp_path / "gpt2"))

    m = tf.AutoModelForCausalLM.from_config(tiny_config("gemma", tok))
    with pytest.raises(ModelSpecError, match=r"'lm_head'.*tied to the input embedding"):
        convert_model(m, include=["lm_head", "*_proj"])
    m.model.layers[1].mlp.up_proj.weight = m.model.layers[0].mlp.up_proj.weight  # a tie between two layers
    with pytest.raises(ModelSpecError, match=r"'model.layers.0.mlp.up_proj'.*tied to model.layers.1.mlp.up_proj.weight"):
        convert_model(m)
    assert not bitlinear_modules(m)  # nothing was half-converted
    convert_model(m, exclude=["up_proj"])  # excluding the tied pair is the way out
    assert type(m.model.layers[0].mlp.up_proj) is nn.Linear

    class Odd(nn.Module):
        def __init__(self, fin):
            super().__init__()
            self.proj = nn.Linear(fin, 4)

    with pytest.raises(ValueError, match=r"module 'proj': input width 0"):
        convert_to_bitlinear(Odd(0))
    odd = Odd(8)
    odd.proj.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"module 'proj'.*torch.int8.*already-quantized"):
        convert_to_bitlinear(odd)

    with pytest.raises(ModelSpecError, match=r"hf:.*no-such-model.*cannot load"):
        load_model(f"hf:{tmp_path / 'no-such-model'}")
    save_tiny("llama", tok, tmp_path / "llama")
    convert_hf(str(tmp_path / "llama"), tmp_path / "ternary")
    with pytest.raises(ModelSpecError, match="already a ternary"):
        load_model(f"hf:{tmp_path / 'ternary'}")


def test_cli_convert(tok, tmp_path, capsys):
    save_tiny("qwen2", tok, tmp_path / "q")
    rc = cli.main(["convert", str(tmp_path / "q"), "--out", str(tmp_path / "o"), "--exclude", "*.mlp.down_proj", "--rms-norm"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM: 12 Linear layers -> BitLinear" in out and "model.layers.0.mlp.down_proj" in out
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc["use_rms_norm"] is True and "model.layers.1.mlp.down_proj" in qc["modules_to_not_convert"]
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    assert cli.main(["convert", str(tmp_path / "q"), "--out", str(tmp_path / "a"), "--include", "*.self_attn.*", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert len(s["converted"]) == 8 and all(".self_attn." in n for n in s["converted"])
    # a model directory without a tokenizer converts, with a note
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("llama", tok)).save_pretrained(tmp_path / "notok")
    assert cli.main(["convert", str(tmp_path / "notok"), "--out", str(tmp_path / "nt")]) == 0
    assert "without a tokenizer" in capsys.readouterr().err and not (tmp_path / "nt" / "tokenizer.json").exists()
    # an architecture it cannot convert: exit 2 with one line naming the problem
    import transformers as tf

    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path / "g")
    assert cli.main(["convert", str(tmp_path / "g"), "--out", str(tmp_path / "g2")]) == 2
    assert "no eligible nn.Linear found in GPT2LMHeadModel" in capsys.readouterr().err
    assert not (tmp_path / "g2").exists()


# ----------------------------------------------------------------------------- recipes


def test_shipped_qat_recipes_validate(tmp_path):
    """The shipped qat-* and distill-* recipes load and validate without network (no model is fetched)."""
    found = sorted((REPO / "recipes").glob("qat-*.yaml")) + sorted((REPO / "recipes").glob("distill-*.yaml"))
    assert any(p.name == "qat-smollm2.yaml" for p in found)
    for p in found:
        r = load_pretrain_recipe(p)
        assert r.model.startswith("hf:") and r.quant == "bitnet" and r.quant_warmup.steps > 0, p
        assert 0 < r.quant_warmup.steps < r.train.max_steps, p
    r = load_pretrain_recipe(REPO / "recipes" / "qat-smollm2.yaml")
    assert r.model == "hf:HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(RecipeError, match="convert.use_rms_norm"):
        load_pretrain_recipe(REPO / "recipes" / "qat-smollm2.yaml", ["convert.use_rms_norm=maybe"])
    r = load_pretrain_recipe(REPO / "recipes" / "distill-smollm2.yaml", ["distill.teacher=hf:elsewhere"])
    assert r.convert.sub_norm and r.distill.teacher == "hf:elsewhere" and r.model.endswith("SmolLM2-135M-Instruct")


def qat_recipe(tmp: Path, name: str, model: str, quant: str, steps: int, warmup: int = 0, lr: float = 3e-3,
               data=SHAKESPEARE, **extra) -> Path:
    recipe = {
        "output_dir": str(tmp / name), "seed": 0, "model": model, "quant": quant,
        "data": {"path": str(data), "seq_len": 64, "val_tokens": 2048},
        "train": {"max_steps": steps, "save_every": steps, "batch_size": 8, "lr": lr, "warmup_steps": 5,
                  "min_lr": lr / 10, "eval_every": steps, "eval_batches": 4, "keep_last": 1},
        "quant_warmup": {"steps": warmup, "shape": "linear"},
        **extra,
    }
    p = tmp / f"{name}.json"  # YAML is a superset of JSON
    p.write_text(json.dumps(recipe))
    return p


def make_tok():
    text = SHAKESPEARE.read_text()
    return train_bpe([text[i : i + 4096] for i in range(0, len(text), 4096)], vocab_size=512)


def qat_run(arch: str, tok, tmp: Path, seed: int = 0):
    """Full precision 100 steps from a tiny init, then QAT (warm-up 30 of 60 steps) from it: the
    two pretrain summaries. Also run by scripts/learning_margins.py over seeds and threads."""
    src = save_tiny(arch, tok, tmp / f"{arch}-init", seed=seed)
    # 1. full precision with our loop, from hf:<dir> with quant: none (the model's own tokenizer)
    fp = pretrain(load_pretrain_recipe(qat_recipe(tmp, "fp", f"hf:{src}", "none", 100, lr=4e-3), [f"seed={seed}"]),
                  progress=False)
    # 2. QAT with warm-up from the trained model, converted on load
    q = pretrain(load_pretrain_recipe(qat_recipe(tmp, "qat", f"hf:{fp['final']}", "bitnet", 60, warmup=30),
                                      [f"seed={seed}"]), progress=False)
    return fp, q


def qat_figures(arch: str, tmp: Path, seed: int) -> dict:
    fp, q = qat_run(arch, make_tok(), tmp, seed)
    naive = q["first_val_loss"]
    return {"fp_drop": fp["first_val_loss"] - fp["val_loss"], "naive_minus_fp": naive - fp["val_loss"],
            "qat_gain": naive - q["val_loss"]}


# Thresholds and their measured spread: `python scripts/learning_margins.py --only qat --seeds 0,1,2
# --threads 1` (the test runs one thread: _one_thread above; results are bitwise the same at 2 threads in
# the pretrain runs, see tests/test_pretrain.py). min .. max over seeds 0-2:
#   fp_drop         full precision learns: first - last val loss    llama 1.84 .. 2.06, qwen2 1.82 .. 2.20  (> 1.0)
#   naive_minus_fp  conversion hurts: naive (converted) - fp loss   llama 0.033 .. 0.072, qwen2 0.063 .. 0.104  (> 0)
#   qat_gain        QAT recovers: naive - QAT val loss              llama 0.46 .. 0.50, qwen2 0.38 .. 0.54  (> 0.15)
# `--seeds 0 --threads 2 --cpu-capability native,default` on 2026-12-06 (transformers 5.25): fp_drop llama 1.82,
# qwen2 1.86; naive_minus_fp 0.086 / 0.073; qat_gain 0.50 / 0.48, within 1e-3 between the two kernel sets.
# `--seeds 0,1 --threads 1 --cpu-capability native,default` (2026-12-06): fp_drop llama 1.70 .. 1.82, qwen2
# 1.70 .. 1.86; naive_minus_fp llama 0.047 .. 0.087, qwen2 0.073 .. 0.187; qat_gain llama 0.36 .. 0.50, qwen2
# 0.45 .. 0.48 (seed 1 is the low end of each; the kernel sets agree within 2e-3); the same to 4 digits at the
# floors (.ci/floors.txt: transformers 5.23).
QAT_MIN = {"fp_drop": 1.0, "naive_minus_fp": 0.0, "qat_gain": 0.15}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_qat_recovers_after_conversion(arch, tok, tmp_path, monkeypatch):
    import bitnet_train.training.quant_warmup as warmup

    # the loop's warm-up calls are recorded to check that they drive every BitLinear of the
    # converted model
    seen = []
    real = warmup.apply_warmup

    def spy(model, step, cfg):
        lam = real(model, step, cfg)
        if any(True for _ in bitlinear_modules(model)):
            seen.append((step, lam, sorted({b.quant_lambda for _, b in bitlinear_modules(model)}), len(bitlinear_modules(model))))
        return lam

    monkeypatch.setattr(warmup, "apply_warmup", spy)
    fp, q = qat_run(arch, tok, tmp_path)
    fp_dir = Path(fp["final"])
    assert json.loads((fp_dir / "config.json").read_text()).get("quantization_config") is None
    naive = q["first_val_loss"]  # step-0 evaluation: converted, quant_lambda 1, no fine-tuning yet
    assert fp["first_val_loss"] - fp["val_loss"] > QAT_MIN["fp_drop"], fp  # full precision learns ...
    assert naive - fp["val_loss"] > QAT_MIN["naive_minus_fp"], (naive, fp["val_loss"])  # conversion hurts ...
    assert naive - q["val_loss"] > QAT_MIN["qat_gain"], (q["val_loss"], naive)  # ... and QAT ends below where it started
    assert [s[0] for s in seen] == list(range(60))
    assert seen[0][1:] == (0.0, [0.0], 14) and seen[15][2] == [0.5] and seen[30][2] == [1.0] and seen[-1][2] == [1.0]
    # 3. the reloaded checkpoint gives the same logits in stock transformers as in bitnet-train
    final = Path(q["final"])
    m = load_model(final).eval()
    assert all(b.quant_lambda == 1.0 for _, b in bitlinear_modules(m)) and len(bitlinear_modules(m)) == 14
    ids = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        ours = m(ids).logits
    assert rel(ours, stock_logits([final], ids, tmp_path)[str(final)]["logits"]) < 1e-5


def test_hf_recipe_tokenizer_rules(tok, tmp_path):
    src = save_tiny("llama", tok, tmp_path / "m")
    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE.read_text()[:40_000])
    with pytest.raises(RecipeError, match=r"data.tokenizer 'bpe:300'.*does not match the embeddings"):
        r = load_pretrain_recipe(qat_recipe(tmp_path, "x", f"hf:{src}", "bitnet", 2, data=small))
        r.data.tokenizer = "bpe:300"
        pretrain(r, progress=False)
    # a full-precision checkpoint directory with quant: bitnet is converted too (with the convert: keys)
    fp = tmp_path / "fpck"
    from bitnet_train.checkpoint.format import save_checkpoint

    save_checkpoint(load_model(f"hf:{src}", quant="none"), fp, tokenizer=tok)
    p = qat_recipe(tmp_path, "y", str(fp), "bitnet", 2, warmup=1, data=small, convert={"exclude": ["*.o_proj"], "use_rms_norm": True})
    r = load_pretrain_recipe(p)
    r.data.tokenizer = str(fp)
    s = pretrain(r, progress=False)
    qc = json.loads((Path(s["final"]) / "config.json").read_text())["quantization_config"]
    assert qc["use_rms_norm"] is True and "model.layers.0.self_attn.o_proj" in qc["modules_to_not_convert"]


# ----------------------------------------------------------------------------- SubLN


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)])
def test_sub_norm_conversion(arch, tied, tok, tmp_path):
    """--sub-norm: a Llama-shaped model becomes a BitNetForCausalLM holding every weight of the
    original (with the two new norms taken out, the full-precision logits are the original's to
    the bit), the new norms start at 1, and stock transformers runs the ternary checkpoint as we do."""
    from transformers import AutoModelForCausalLM, BitNetForCausalLM

    from bitnet_train.modeling.convert import with_sub_norms

    cfg = tiny_config(arch, tok)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(3)
    src_model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for n, p in src_model.named_parameters():
            if n.endswith("bias"):
                p.uniform_(-0.5, 0.5)  # Qwen2's q/k/v biases non-trivial, so that carrying them over is checked
    src = tmp_path / "hf"
    src_model.save_pretrained(src)
    tok.save_pretrained(src)
    ids = torch.randint(0, len(tok), (2, 20))

    fp = with_sub_norms(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)).eval()
    assert type(fp) is BitNetForCausalLM and fp.config.hidden_act == "silu"
    assert fp.config.tie_word_embeddings is tied and (fp.lm_head.weight is fp.get_input_embeddings().weight) is tied
    assert fp.config.attention_bias is (arch == "qwen2")
    norms = [m for n, m in fp.named_modules() if n.endswith(("attn_sub_norm", "ffn_sub_norm"))]
    assert len(norms) == 2 * DIMS["num_hidden_layers"] and all(bool((m.weight == 1).all()) for m in norms)
    for layer in fp.model.layers:
        layer.self_attn.attn_sub_norm = nn.Identity()
        layer.mlp.ffn_sub_norm = nn.Identity()
    with torch.no_grad():
        assert torch.equal(fp(ids).logits, src_model(ids).logits)

    # calibrated (the default of convert): each norm's weights are the mean RMS of its input on a
    # built-in sample, so the full-precision model moves less than with weights 1
    from bitnet_train.modeling.convert import calibration_ids

    ones = with_sub_norms(src_model).eval()
    cal = with_sub_norms(src_model, calibrate=calibration_ids(tok)).eval()
    with torch.no_grad():
        ref = src_model(ids).logits
        d_ones, d_cal = rel(ones(ids).logits, ref), rel(cal(ids).logits, ref)
    assert d_cal < d_ones and not torch.equal(cal.model.layers[0].mlp.ffn_sub_norm.weight, ones.model.layers[0].mlp.ffn_sub_norm.weight)

    s = convert_hf(str(src), tmp_path / "ck", sub_norm=True)
    assert s["sub_norm"] and len(s["converted"]) == 7 * DIMS["num_hidden_layers"]
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert raw["model_type"] == "bitnet" and raw["architectures"] == ["BitNetForCausalLM"]
    ours = load_checkpoint(tmp_path / "ck").eval()
    with torch.no_grad():
        mine = ours(ids).logits
    stock = stock_logits([tmp_path / "ck"], ids, tmp_path)[str(tmp_path / "ck")]
    assert rel(mine, stock["logits"]) < 1e-5 and "AutoBitLinear" in stock["classes"]


def test_sub_norm_refuses_other_blocks(tok, tmp_path):
    from bitnet_train.modeling.convert import with_sub_norms
    from transformers import AutoModelForCausalLM

    for arch in ("qwen3", "gemma", "phi3"):
        m = AutoModelForCausalLM.from_config(tiny_config(arch, tok))
        with pytest.raises(ModelSpecError, match=f"sub_norm needs a Llama-shaped block.*model_type is '{arch}'"):
            with_sub_norms(m)
    cfg = tiny_config("mistral", tok)
    cfg.sliding_window = 16
    with pytest.raises(ModelSpecError, match="config.sliding_window is 16"):
        with_sub_norms(AutoModelForCausalLM.from_config(cfg))
    cfg = tiny_config("llama", tok)
    cfg.mlp_bias = True
    with pytest.raises(ModelSpecError, match="config.mlp_bias"):
        with_sub_norms(AutoModelForCausalLM.from_config(cfg))
    # from the command line: a clear error, nothing written
    src = save_tiny("gemma", tok, tmp_path / "g")
    rc = cli.main(["convert", str(src), "--out", str(tmp_path / "out"), "--sub-norm"])
    assert rc == 2 and not (tmp_path / "out").exists()
