"""Distillation from a full-precision teacher (``distill:`` in a pretraining recipe): the loss parts
equal a computation by hand, a teacher equal to the student contributes nothing, a distilled QAT run
logs its parts and the teacher's time, resumes to the same losses, runs with grad accumulation and
with ``quant: none``; a teacher that does not fit is refused before training. Tiny Llama models
built in the test (a teacher trained here with our loop): no download."""

import json
import math
from pathlib import Path

import pytest
import torch

from bitnet_train import cli
from bitnet_train.modeling.convert import load_hf_converted
from bitnet_train.training.distill import make_objective
from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

from test_convert import _one_thread, make_tok, qat_recipe, save_tiny, tiny_config  # noqa: E402,F401 - _one_thread: autouse
from conftest import SHAKESPEARE  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tok()


def _small(tmp: Path) -> Path:
    p = tmp / "small.txt"
    p.write_text(SHAKESPEARE.read_text()[:60_000])
    return p


def _recipe(tmp, name, model, quant="bitnet", steps=4, distill=None, **kw):
    extra = {"distill": distill} if distill is not None else {}
    return load_pretrain_recipe(qat_recipe(tmp, name, model, quant, steps, data=_small(tmp), **extra, **kw))


# ----------------------------------------------------------------------------- the loss, by hand


def _by_hand(student, teacher, x, T, layer, heads, similarity="scaled_dot"):
    """CE, KD and the Q/K/V relation KL written out with explicit loops over heads."""
    inp, lab = x[:, :-1], x[:, 1:]
    out = {}
    with torch.no_grad():
        s = student(input_ids=inp, output_hidden_states=True)
        t = teacher(input_ids=inp, output_hidden_states=True)
        out["ce"] = torch.nn.functional.cross_entropy(s.logits.reshape(-1, s.logits.shape[-1]), lab.reshape(-1))
        ps = torch.softmax(s.logits / T, -1)
        pt = torch.softmax(t.logits / T, -1)
        out["kd"] = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
        rel = 0.0
        for name in "qkv":
            acts = []
            for m, hs in ((student, s.hidden_states), (teacher, t.hidden_states)):
                blk = m.model.layers[layer]
                acts.append(getattr(blk.self_attn, f"{name}_proj")(blk.input_layernorm(hs[layer])))
            w = acts[0].shape[-1]
            d = w // heads
            kl = []
            for r in range(heads):
                a_s, a_t = (a[..., r * d:(r + 1) * d] for a in acts)
                if similarity == "cosine":  # each row over its length: the scores are cosines
                    a_s, a_t = (a / a.pow(2).sum(-1, keepdim=True).sqrt() for a in (a_s, a_t))
                    p_s = torch.softmax(a_s @ a_s.transpose(1, 2), -1)
                    p_t = torch.softmax(a_t @ a_t.transpose(1, 2), -1)
                else:
                    p_s = torch.softmax(a_s @ a_s.transpose(1, 2) / math.sqrt(d), -1)
                    p_t = torch.softmax(a_t @ a_t.transpose(1, 2) / math.sqrt(d), -1)
                kl.append((p_t * (p_t.log() - p_s.log())).sum(-1).mean())
            rel = rel + torch.stack(kl).mean()
        out["relation"] = rel
    return out


@pytest.mark.parametrize("similarity", ["scaled_dot", "cosine"])
def test_loss_parts_equal_a_computation_by_hand(tok, tmp_path, similarity):
    torch.manual_seed(0)
    teacher_dir = save_tiny("llama", tok, tmp_path / "teacher", seed=1)
    student = load_hf_converted(str(teacher_dir), sub_norm=True).eval()
    with torch.no_grad():  # move the student off the teacher, so that every part is non-zero
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = {"teacher": f"hf:{teacher_dir}", "ce_weight": 0.5, "kd_weight": 2.0, "temperature": 3.0,
         "relation_weight": 7.0, "relation_layer": -1, "relation_heads": 8, "relation_similarity": similarity,
         "teacher_dtype": "float32"}
    r = _recipe(tmp_path, "x", f"hf:{teacher_dir}", distill=d)
    obj = make_objective(r, student, tok, "cpu", announce=False)
    x = torch.randint(0, len(tok), (3, 17))
    loss, parts = obj(student, x)
    hand = _by_hand(student, obj.teacher, x, T=3.0, layer=1, heads=8, similarity=similarity)
    for k in ("ce", "kd", "relation"):
        assert parts[f"loss_{k}"].item() == pytest.approx(hand[k].item(), rel=1e-5), k
        assert hand[k].item() > 1e-4, k
    assert loss.item() == pytest.approx((0.5 * hand["ce"] + 2.0 * hand["kd"] + 7.0 * hand["relation"]).item(), rel=1e-5)
    # the gradient reaches the student through every part, never the teacher
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    stats = obj.step_stats()
    assert stats["teacher_s"] > 0 and obj.step_stats() == {"teacher_s": 0, "teacher_mib": 0}
    # the teacher's logits (fp32 [b, s, vocab]) and, with relations, one layer's Q/K/V outputs
    c = obj.teacher.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    held = 3 * 16 * (c.vocab_size + c.num_attention_heads * head_dim + 2 * c.num_key_value_heads * head_dim) * 4
    assert stats["teacher_mib"] == round(held / 2**20, 2) > 0


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_one_pass_losses_equal_autograd(T):
    """CE and KD computed together a few rows at a time (``logit_losses``) give the values and the
    gradient of the same formulas written with autograd, rows whose label is -100 left out of the
    cross-entropy (not of the KL)."""
    from bitnet_train.training import distill_losses

    torch.manual_seed(0)
    s0, t = torch.randn(37, 300) * 3, torch.randn(37, 300) * 3  # 37 rows: the last block is partial
    labels = torch.randint(0, 300, (37,))
    labels[::4] = -100
    s = s0.clone().requires_grad_(True)
    total, ce, kd = distill_losses.logit_losses(s, t, T, labels, ce_weight=0.7, kd_weight=2.5)
    total.backward()
    r = s0.clone().requires_grad_(True)
    ce_ref = torch.nn.functional.cross_entropy(r, labels, reduction="sum")
    pt = torch.softmax(t / T, -1)
    kd_ref = (pt * (pt.log() - torch.log_softmax(r / T, -1))).sum() * T * T
    (0.7 * ce_ref + 2.5 * kd_ref).backward()
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-5) and kd.item() == pytest.approx(kd_ref.item(), rel=1e-5)
    assert total.item() == pytest.approx((0.7 * ce_ref + 2.5 * kd_ref).item(), rel=1e-5)
    assert torch.allclose(s.grad, r.grad, atol=1e-6, rtol=1e-4)
    assert not ce.requires_grad and not kd.requires_grad
    # each part alone: no teacher, or no labels
    s = s0.clone().requires_grad_(True)
    total, ce, kd = distill_losses.logit_losses(s, None, T, labels, ce_weight=1.0, kd_weight=1.0)
    total.backward()
    r = s0.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(r, labels, reduction="sum").backward()
    assert kd.item() == 0 and torch.allclose(s.grad, r.grad, atol=1e-6)
    s = s0.clone().requires_grad_(True)
    distill_losses.kd_loss(s, t, T).backward()
    r = s0.clone().requires_grad_(True)
    (pt * (pt.log() - torch.log_softmax(r / T, -1))).sum(-1).mean().mul(T * T).backward()
    assert torch.allclose(s.grad, r.grad, atol=1e-7, rtol=1e-4)
    # the gradient is scaled in place in the backward: a second backward through the same loss is refused
    total, _, _ = distill_losses.logit_losses(s0.clone().requires_grad_(True), t, T, labels)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        total.backward()


def test_a_teacher_equal_to_the_student_gives_zero(tok, tmp_path):
    teacher_dir = save_tiny("llama", tok, tmp_path / "teacher", seed=2)
    r = _recipe(tmp_path, "x", f"hf:{teacher_dir}", "none",
                distill={"teacher": f"hf:{teacher_dir}", "relation_weight": 1.0, "teacher_dtype": "float32"})
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    obj = make_objective(r, student, tok, "cpu", announce=False)
    x = torch.randint(0, len(tok), (2, 33))
    _, parts = obj(student, x)
    assert abs(parts["loss_kd"].item()) < 1e-6 and abs(parts["loss_relation"].item()) < 1e-6
    assert parts["loss_ce"].item() > 1.0


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_auto_teacher_dtype_is_bfloat16_where_the_cpu_has_it(tok, tmp_path, monkeypatch, bf16_cpu):
    """``teacher_dtype: auto`` on the CPU: bfloat16 where the CPU has AVX-512 BF16 (or AMX), float32
    elsewhere; the teacher's logits are then the bfloat16 model's, and the loss stays float32."""
    from bitnet_train.training import distill

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: bf16_cpu, raising=False)
    assert distill.bf16_is_fast("cpu") is bf16_cpu and distill.bf16_is_fast("meta") is False
    teacher_dir = save_tiny("llama", tok, tmp_path / "teacher", seed=3)
    r = _recipe(tmp_path, "x", f"hf:{teacher_dir}", "none", distill={"teacher": f"hf:{teacher_dir}"})
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    obj = make_objective(r, student, tok, "cpu", announce=False)
    want = torch.bfloat16 if bf16_cpu else torch.float32
    assert {p.dtype for p in obj.teacher.parameters()} == {want}
    x = torch.randint(0, len(tok), (2, 33))
    loss, parts = obj(student, x)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    # the same model in bfloat16 differs from the student by its rounding only: a small, non-zero KD
    # (float32: exactly the same logits, KD 0)
    assert (parts["loss_kd"].item() > 0) is bf16_cpu and parts["loss_kd"].item() < 1e-4, parts["loss_kd"].item()


# ----------------------------------------------------------------------------- a distilled run


@pytest.fixture(scope="module")
def trained_teacher(tok, tmp_path_factory):
    """A tiny Llama trained in full precision with our loop: the teacher of the runs below."""
    tmp = tmp_path_factory.mktemp("teacher")
    src = save_tiny("llama", tok, tmp / "init")
    s = pretrain(load_pretrain_recipe(qat_recipe(tmp, "fp", f"hf:{src}", "none", 60, lr=4e-3, data=_small(tmp))),
                 progress=False)
    return Path(s["final"])


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_distilled_qat_run_logs_parts_and_resumes_exactly(trained_teacher, tmp_path, capfd):
    d = {"teacher": str(trained_teacher), "kd_weight": 1.0, "temperature": 2.0, "relation_weight": 1.0}
    kw = dict(distill=d, convert={"sub_norm": True}, steps=8, warmup=4)

    def recipe(name):
        r = _recipe(tmp_path, name, f"hf:{trained_teacher}", **kw)
        r.train.save_every, r.train.eval_every, r.train.grad_accum = 4, 4, 2
        return r

    whole = pretrain(recipe("whole"), progress=False)
    err = capfd.readouterr().err
    from bitnet_train.training.distill import bf16_is_fast

    dtype = "torch.bfloat16" if bf16_is_fast("cpu") else "torch.float32"  # teacher_dtype: auto
    assert f"distilling from {trained_teacher}" in err and f"MiB of {dtype} weights" in err
    steps = [m for m in _metrics(tmp_path / "whole") if "loss" in m]
    assert len(steps) == 8
    for m in steps:
        assert m["loss"] == pytest.approx(m["loss_ce"] + m["loss_kd"] + m["loss_relation"], rel=1e-6)
        assert m["loss_kd"] > 0 and m["loss_relation"] > 0 and m["teacher_s"] > 0
    assert [m.get("quant_lambda") for m in steps[:5]] == [0.0, 0.25, 0.5, 0.75, None]
    cfg = json.loads((Path(whole["final"]) / "config.json").read_text())
    assert cfg["model_type"] == "bitnet" and cfg["quantization_config"]["quant_method"] == "bitnet"

    # interrupted at step 4 and resumed (the teacher is read again from the recipe): the same losses
    part = pretrain(recipe("parts"), progress=False, stop_after=4)
    assert part["interrupted"]
    resumed = pretrain(recipe("parts"), resume=True, progress=False)
    a = [(m["step"], m["loss"], m["loss_kd"]) for m in _metrics(tmp_path / "whole") if "loss" in m]
    b = [(m["step"], m["loss"], m["loss_kd"]) for m in _metrics(tmp_path / "parts") if "loss" in m]
    assert a == b and resumed["val_loss"] == whole["val_loss"]


def test_full_precision_distillation_control(trained_teacher, tmp_path):
    r = _recipe(tmp_path, "fpkd", f"hf:{trained_teacher}", "none", steps=3,
                distill={"teacher": f"hf:{trained_teacher}", "kd_weight": 1.0})
    s = pretrain(r, progress=False)
    steps = [m for m in _metrics(tmp_path / "fpkd") if "loss" in m]
    assert len(steps) == 3 and all("loss_kd" in m and "quant_lambda" not in m for m in steps)
    assert json.loads((Path(s["final"]) / "config.json").read_text()).get("quantization_config") is None


# ----------------------------------------------------------------------------- bad input


def test_a_teacher_that_does_not_fit_is_refused_before_training(tok, trained_teacher, tmp_path):
    from test_bad_input import assert_clean_error

    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-vocab"
    cfg = tiny_config("llama", tok)
    cfg.vocab_size += 16
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    base = qat_recipe(tmp_path, "bad", f"hf:{trained_teacher}", "bitnet", 2, data=_small(tmp_path))
    cases = [
        ([f"distill.teacher={other}"], ["distill.teacher", "vocabulary of", "the student"]),
        ([f"distill.teacher={trained_teacher}", "distill.relation_weight=1", "distill.relation_layer=2"],
         ["distill.relation_layer 2 is out of range", "has 2 layers"]),
        ([f"distill.teacher={trained_teacher}", "distill.relation_weight=1", "distill.relation_heads=3"],
         ["distill.relation_heads 3 does not divide", "q_proj width 64"]),
        ([f"distill.teacher={tmp_path / 'nowhere'}"], ["distill.teacher", "not a checkpoint directory"]),
        ([f"distill.teacher={trained_teacher}", "distill.kd_weight=0", "distill.ce_weight=0"], ["all 0"]),
    ]
    for sets, words in cases:
        args = ["pretrain", str(base), "--no-progress"]
        for s in sets:
            args += ["--set", s]
        rc, err = _cli(args)
        assert_clean_error(rc, err, *words)
        assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    # a tokenizer that encodes differently, with the same vocabulary size
    shuffled = tmp_path / "shuffled"
    import shutil

    shutil.copytree(trained_teacher, shuffled)
    tj = json.loads((shuffled / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (shuffled / "tokenizer.json").write_text(json.dumps(tj))
    rc, err = _cli(["pretrain", str(base), "--no-progress", "--set", f"distill.teacher={shuffled}"])
    assert_clean_error(rc, err, "its tokenizer is not the run's", "vocabularies differ")


def _cli(args):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = cli.main(args)
    return rc, buf.getvalue()


def test_distill_keys_are_copied_to_the_student_checkpoint_recipe(trained_teacher, tmp_path):
    # the recipe saved with a checkpoint names the teacher it was distilled from
    r = _recipe(tmp_path, "rk", f"hf:{trained_teacher}", steps=1, distill={"teacher": str(trained_teacher)})
    s = pretrain(r, progress=False)
    saved = json.loads((Path(s["final"]) / "bitnet_train.json").read_text())["recipe"]["distill"]
    assert saved["teacher"] == str(trained_teacher) and saved["kd_weight"] == 10.0



# ----------------------------------------------------------------------------- several processes


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_distil_like_one(mode, tmp_path, shakespeare_path):
    """DDP and FSDP2 (2 CPU processes x batch B, the teacher replicated on each) give the losses
    and loss parts of 1 process x 2B within the tolerances of tests/test_ddp.py and test_fsdp.py."""
    from test_ddp import TOLERANCE as DDP_TOL
    from test_ddp import _launch as ddp_launch
    from test_fsdp import TOLERANCE as FSDP_TOL
    from test_fsdp import launch_two
    from test_pretrain import read_metrics, write_recipe

    p = write_recipe(tmp_path, shakespeare_path)
    common = ["train.max_steps=3", "train.save_every=10", "train.eval_every=3", "train.eval_batches=2",
              "train.warmup_steps=1", "train.lr=0.01", "train.min_lr=0.001"]
    # the teacher: the same preset trained 3 steps in full precision, its tokenizer the run's
    t = pretrain(load_pretrain_recipe(p, common + [f"output_dir={tmp_path}/teacher", "quant=none",
                                                  "train.batch_size=8"]), progress=False)
    sets = common + [f"data.tokenizer={t['final']}", f"distill.teacher={t['final']}", "distill.kd_weight=1",
                     "distill.relation_weight=1", "distill.temperature=2"]
    one = pretrain(load_pretrain_recipe(p, sets + [f"output_dir={tmp_path}/one", "train.batch_size=8"]), progress=False)
    two = sets + [f"output_dir={tmp_path}/two", "train.batch_size=4"]
    if mode == "ddp":
        ddp_launch(tmp_path, p, "full", two)
    else:
        worker = ("import sys\nfrom bitnet_train.training.pretrain import load_pretrain_recipe, pretrain\n"
                  "print('SUMMARY', pretrain(load_pretrain_recipe(sys.argv[1], sys.argv[2:]), progress=False))\n")
        out = launch_two(tmp_path, worker, ["--use_fsdp", "--fsdp_version", "2"], [p, *two])
        assert "'fsdp': True" in out
    tol = {**(DDP_TOL if mode == "ddp" else FSDP_TOL), "loss_kd": 5e-4, "loss_relation": 5e-3}
    a = [m for m in read_metrics(tmp_path / "one") if "loss" in m]
    b = [m for m in read_metrics(tmp_path / "two") if "loss" in m]
    assert len(a) == len(b) == 3 and one["world_size"] == 1
    for ra, rb in zip(a, b):
        assert ra["loss_kd"] > 0 and ra["loss_relation"] > 0
        for k, rel in tol.items():
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-6), (k, ra, rb)
