"""``bitnet-train eval``: NLL, perplexity and bits per byte, checked by hand, across runtimes and against
lm-evaluation-harness.

The model is a tiny SiLU BitNet trained 30 steps on the first 200k characters of tinyshakespeare; it is
scored on paragraphs from the rest (held out).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet_train.cli import main
from bitnet_train.evaluation.evaluate import evaluate, rolling_windows

# |bits per byte of the export / of the checkpoint - 1|. Measured with `python scripts/bench_tolerances.py
# bits-per-byte` (docs/eval.md; seeds 0-1, 0 and 30 steps, per document and packed): hf at most 1.7e-5, GGUF
# F32 4.8e-5 and TQ2_0 6.9e-5 in llama.cpp; a ReLU² model forced into llama.cpp's SiLU graph 1.3e-3.
TOL = {"hf": 1e-4, "f32": 5e-4, "tq2_0": 5e-4}


@pytest.fixture(scope="module")
def text():
    from conftest import SHAKESPEARE

    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, text):
    from test_export import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", text[:200_000], steps=30)


@pytest.fixture(scope="module")
def docs(tmp_path_factory, text) -> Path:
    """40 held-out paragraphs as a jsonl corpus."""
    paras = [p.strip() for p in text[200_000:].split("\n\n") if p.strip()][:40]
    f = tmp_path_factory.mktemp("docs") / "held.jsonl"
    f.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras), encoding="utf-8")
    return f


def _hand_nll(model, seqs: list[list[int]]) -> float:
    """Summed -log p(seq[i] | seq[:i]) over i >= 1 of each sequence, fed whole (float64 log-softmax)."""
    total = 0.0
    with torch.no_grad():
        for s in seqs:
            lp = torch.log_softmax(model(torch.tensor([s[:-1]])).logits[0].double(), -1)
            total -= float(lp[torch.arange(len(s) - 1), torch.tensor(s[1:])].sum())
    return total


def test_nll_by_hand(ckpt, tmp_path):
    from bitnet_train.modeling.models import load_model
    from bitnet_train.data.tokenizer import load_tokenizer

    texts = ["First Citizen:\nWe are accounted poor citizens.", "MENENIUS:\nWhy, masters, my good friends, mine honest neighbours"]
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok, model = load_tokenizer(str(ckpt)), load_model(ckpt, backend="torch").eval()
    eos = tok.eos_token_id
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    nbytes = sum(len(t.encode()) for t in texts)
    assert min(len(i) for i in ids) > 8

    # per document, windows longer than the documents: each scored once from EOS
    nll = _hand_nll(model, [[eos] + i for i in ids])
    r = evaluate(str(ckpt), str(f), per_document=True, progress=False)
    assert r["tokens"] == sum(len(i) for i in ids) and r["bytes"] == nbytes and r["documents"] == 2
    assert r["loss"] == pytest.approx(nll / r["tokens"], rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(nll / r["tokens"]), rel=1e-6)

    # packed in windows of 8 predictions: EOS d1 EOS d2 EOS, each window from a fresh context
    stream = [eos] + ids[0] + [eos] + ids[1] + [eos]
    nll = _hand_nll(model, [stream[i : i + 9] for i in range(0, len(stream) - 1, 8)])
    r = evaluate(str(ckpt), str(f), seq_len=8, progress=False)
    assert r["tokens"] == len(stream) - 1 and r["bytes"] == nbytes
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)

    # --max-tokens cuts inside the second document: the bytes are those its first tokens cover
    k = len(ids[0]) + 1 + 5
    r = evaluate(str(ckpt), str(f), seq_len=8, max_tokens=k, progress=False)
    covered = len(tok.decode(ids[1][:5]).encode())
    assert r["tokens"] == k and r["bytes"] == len(texts[0].encode()) + covered
    nll = _hand_nll(model, [stream[i : min(i + 9, k + 1)] for i in range(0, k, 8)])
    assert r["loss"] == pytest.approx(nll / k, rel=1e-6)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 16, 17, 40])
def test_rolling_windows_are_lm_evals(n):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    toks = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, prefix_token=7, max_seq_len=8, context_len=1)]
    ours = list(rolling_windows(toks, 7, 8))
    assert ours == [(a + b, len(b)) for a, b in theirs]
    assert sum(k for _, k in ours) == n and all(len(s) - 1 <= 8 for s, _ in ours)


@pytest.fixture(scope="module")
def exports(ckpt, tmp_path_factory):
    from bitnet_train.export import export

    d = tmp_path_factory.mktemp("exports")
    out = {"hf": d / "hf"}
    export(ckpt, "hf", out["hf"], verify=False, log=lambda *a: None)
    for q in ("f32", "tq2_0"):
        out[q] = d / f"{q}.gguf"
        export(ckpt, "gguf", out[q], quant=q, verify=False, log=lambda *a: None)
    return out


@pytest.mark.parametrize("fmt", ["hf", "f32", "tq2_0"])
def test_checkpoint_and_export_agree(ckpt, exports, docs, fmt):
    for per_document in (True, False):
        ours = evaluate(str(ckpt), str(docs), per_document=per_document, progress=False)
        theirs = evaluate(str(exports[fmt]), str(docs), per_document=per_document, progress=False)
        assert theirs["runtime"] == {"hf": "transformers"}.get(fmt, "llama.cpp") and ours["runtime"] == "bitnet-train"
        assert theirs["bytes"] == ours["bytes"] and theirs["tokens"] == ours["tokens"]  # same tokenizer
        assert abs(theirs["bits_per_byte"] / ours["bits_per_byte"] - 1) < TOL[fmt], (fmt, per_document, ours, theirs)
        assert 1.0 < ours["bits_per_byte"] < 8.0


def test_relu2_checkpoint_and_ik_export_agree(docs, tmp_path, text):
    """A ReLU² model's GGUF for ik_llama.cpp (arch bitnet-25, F32) scores as the checkpoint does. Measured
    after merging the ik_llama.cpp exporter (tiny, 2 layers, 30 steps, 60 held-out paragraphs): 5.3e-6
    relative per document, 6.7e-6 packed."""
    from bitnet_train.export import export
    from test_export import make_checkpoint

    relu2 = make_checkpoint(tmp_path / "relu2", text[:200_000], preset="tiny", steps=30)
    out = tmp_path / "ik.gguf"
    from bitnet_train.runtimes import ikllama

    if not ikllama.available():
        pytest.skip("no ik-llama-cpp-python wheel for this platform")
    export(relu2, "gguf", out, quant="f32", runtime="ik_llama.cpp", verify=False, log=lambda *a: None)
    for per_document in (True, False):
        ours = evaluate(str(relu2), str(docs), per_document=per_document, progress=False)
        theirs = evaluate(str(out), str(docs), per_document=per_document, progress=False)
        assert theirs["runtime"] == "ik_llama.cpp" and theirs["tokens"] == ours["tokens"]
        assert abs(theirs["bits_per_byte"] / ours["bits_per_byte"] - 1) < TOL["f32"], (per_document, ours, theirs)


def _write_tasks(d: Path, docs: Path) -> tuple[Path, Path, list[dict]]:
    rows = [{"q": "First Citizen:\nBefore we proceed any further, hear me", "choices": ["speak.", "banana.", "seventeen."], "label": 0},
            {"q": "All:\nSpeak,", "choices": ["xylophone.", "speak.", "quantum."], "label": 1},
            {"q": "You are all resolved rather to die than to", "choices": ["compile?", "email?", "famish?"], "label": 2},
            {"q": "We know't, we", "choices": ["know't.", "zebra.", "kilobyte."], "label": 0}]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    roll = d / "roll.yaml"
    roll.write_text(f"task: bt_rolling\ndataset_path: json\ndataset_kwargs:\n  data_files: {docs}\ntest_split: train\n"
                    "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                    "metric_list:\n  - metric: bits_per_byte\n")
    mc = d / "mc.yaml"
    mc.write_text(f"task: bt_mc\ndataset_path: json\ndataset_kwargs:\n  data_files: {d / 'mc.jsonl'}\ntest_split: train\n"
                  "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
                  "metric_list:\n  - metric: acc\n")
    return roll, mc, rows


def test_lm_eval_tasks(ckpt, docs, tmp_path, capsys):
    from bitnet_train.modeling.models import load_model
    from bitnet_train.data.tokenizer import load_tokenizer

    roll, mc, rows = _write_tasks(tmp_path, docs)
    out = tmp_path / "res" / "results.json"
    assert main(["eval", str(ckpt), "--tasks", f"{roll},{mc}", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bt_rolling" in printed and "bt_mc" in printed and str(out) in printed
    res = json.loads(out.read_text())["results"]

    ours = evaluate(str(ckpt), str(docs), per_document=True, progress=False)
    assert abs(res["bt_rolling"]["bits_per_byte,none"] / ours["bits_per_byte"] - 1) < 0.01

    # the multiple-choice accuracy, by hand: argmax over choices of log p(" " + choice | question)
    tok, model = load_tokenizer(str(ckpt)), load_model(ckpt, backend="torch").eval()
    right = 0
    for r in rows:
        ctx = tok(r["q"], add_special_tokens=False)["input_ids"]
        lls = []
        for c in r["choices"]:
            whole = tok(r["q"] + " " + c, add_special_tokens=False)["input_ids"]
            seq = ctx + whole[len(ctx):]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].double(), -1)
            lls.append(float(lp[torch.arange(len(ctx) - 1, len(seq) - 1), torch.tensor(seq[len(ctx):])].sum()))
        right += int(np.argmax(lls) == r["label"])
    assert res["bt_mc"]["acc,none"] == pytest.approx(right / len(rows))


def _err(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input(ckpt, docs, tmp_path, capsys, text):
    import gguf

    from bitnet_train.export import export
    from test_export import make_checkpoint

    missing = tmp_path / "nope.jsonl"
    assert str(missing) in _err(["eval", str(ckpt), "--data", str(missing)], capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    assert "no text to score" in _err(["eval", str(ckpt), "--data", str(empty)], capsys)
    assert "nope-model" in _err(["eval", str(tmp_path / "nope-model"), "--data", str(docs)], capsys)
    assert "'no_such_task_xyz'" in _err(["eval", str(ckpt), "--tasks", "no_such_task_xyz"], capsys)
    assert "--seq-len 4096" in _err(["eval", str(ckpt), "--data", str(docs), "--seq-len", "4096"], capsys)

    relu2 = make_checkpoint(tmp_path / "relu2", text[:50_000], preset="tiny", steps=0)
    g = tmp_path / "relu2.gguf"
    # into llama.cpp's SiLU graph (arch bitnet), the target an exporter that knows ik_llama.cpp must be told
    export(relu2, "gguf", g, quant="f32", runtime="llama.cpp", force=True, verify=False, log=lambda *a: None)
    err = _err(["eval", str(g), "--data", str(docs)], capsys)
    assert str(g) in err and "relu2" in err and "SiLU" in err

    ik = tmp_path / "ik.gguf"  # a ReLU² file for ik_llama.cpp (header only: eval must not run it in llama.cpp)
    w = gguf.GGUFWriter(str(ik), "bitnet-25")
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 256), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = _err(["eval", str(ik), "--data", str(docs)], capsys)
    assert str(ik) in err

    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"not a gguf")
    assert "not a GGUF" in _err(["eval", str(notgguf), "--data", str(docs)], capsys)


def test_cli_json_and_table(ckpt, docs, capsys):
    assert main(["eval", str(ckpt), "--data", str(docs), "--json", "--max-tokens", "300", "--seq-len", "64"]) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    assert set(r) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "tokens_per_s", "model", "runtime"}
    assert r["tokens"] == 300 and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert "eval [bitnet-train]" in cap.err  # the progress bar
    assert main(["eval", str(ckpt), "--data", "builtin:pydoc", "--max-tokens", "200", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "bits per byte" in cap.out and "tokens 200" in cap.out
    # no bar at all: neither ours nor transformers' weight loading; the libraries' switches are restored
    assert "eval [bitnet-train]" not in cap.err and "Loading weights" not in cap.err, cap.err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    assert main(["eval", str(ckpt), "--data", str(docs), "--max-tokens", "100", "--seq-len", "64"]) == 0
    assert "Loading weights" in capsys.readouterr().err
