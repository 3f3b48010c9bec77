"""A small verifiable alignment task for tests and scripts/bench_align.py (no downloads).

Prompts list three words separated by commas: ``last:list,value,name``. SFT teaches the answer
``name`` (the last word); DPO then teaches ``first:...`` prompts to prefer the first word (chosen)
over the last one (rejected), which the SFT model tends to copy.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

CANDIDATES = ("the list value name object type class string key code self int str dict set file "
              "line data path error none true false return default method number args").split()


# the word list of recipes/data/*-tiny.jsonl (one token each in the tiny recipe's BPE)
TINY_WORDS = ["the", "list", "value", "name", "object", "type", "class", "string", "key", "code"]
HELD_OUT = 40  # the first HELD_OUT shuffled triples are never trained on


def split(ts):
    """(held-out, training) triples."""
    return ts[:HELD_OUT], ts[HELD_OUT:]


def task_words(tok, n: int = 10) -> list[str]:
    """Words that the tokenizer writes as one token (so every answer is one token plus EOS)."""
    words = [w for w in CANDIDATES if len(tok.tokenize(w)) == 1 and len(tok.tokenize("," + w)) == 2]
    if len(words) < 6:
        raise RuntimeError(f"only {len(words)} single-token task words in this tokenizer: {words}")
    return words[:n]


def triples(words, seed: int = 0) -> list[tuple[str, str, str]]:
    ts = list(itertools.permutations(words, 3))
    random.Random(seed).shuffle(ts)
    return ts


# SFT asks for one end of the list, DPO for the other one
SFT_ASK, DPO_ASK = "last", "first"
_POS = {"first": 0, "last": 2}


def sft_rows(ts, conversational: bool = True, ask: str | None = None) -> list[dict]:
    ask = ask or SFT_ASK
    rows = []
    for t in ts:
        prompt, answer = f"{ask}:" + ",".join(t), t[_POS[ask]]
        if conversational:
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        else:
            rows.append({"prompt": prompt, "completion": answer})
    return rows


def dpo_rows(ts, ask: str | None = None) -> list[dict]:
    """chosen: the word asked for; rejected: the word at the other end (what SFT taught to copy)."""
    ask = ask or DPO_ASK
    i = _POS[ask]
    return [{"prompt": [{"role": "user", "content": f"{ask}:" + ",".join(t)}],
             "chosen": [{"role": "assistant", "content": t[i]}],
             "rejected": [{"role": "assistant", "content": t[2 - i]}]} for t in ts]


def write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def exact_match(model, tok, ts, max_new_tokens: int = 4, ask: str | None = None) -> float:
    """Share of SFT-task prompts whose greedy answer is exactly the word asked for."""
    ask = ask or SFT_ASK
    import torch

    model.eval()
    hits = 0
    with torch.no_grad():
        for t in ts:
            ids = tok.apply_chat_template([{"role": "user", "content": f"{ask}:" + ",".join(t)}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            hits += text.strip() == t[_POS[ask]]
    return hits / len(ts)


def completion_logp(model, tok, prompt_msgs, answer: str) -> float:
    """log p(answer + EOS | chat-formatted prompt) under ``model``."""
    import torch

    p = tok.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(prompt_msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(p)
    p_ids = tok(p, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    x = torch.tensor([f_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
    tgt = x[0, 1:]
    lp = logp.gather(-1, tgt[:, None])[:, 0]
    return float(lp[len(p_ids) - 1:].sum())


def preference_margins(model, tok, ts, ask: str | None = None) -> list[float]:
    """Per held-out DPO-task item: log p(word asked for, chosen) - log p(word at the other end,
    rejected), the word the SFT model tends to copy."""
    ask = ask or DPO_ASK
    i = _POS[ask]
    model.eval()
    out = []
    for t in ts:
        msgs = [{"role": "user", "content": f"{ask}:" + ",".join(t)}]
        out.append(completion_logp(model, tok, msgs, t[i]) - completion_logp(model, tok, msgs, t[2 - i]))
    return out


def preference_accuracy(model, tok, ts, ask: str | None = None) -> float:
    """Share of DPO-task pairs where the chosen word gets the higher log-probability."""
    m = preference_margins(model, tok, ts, ask)
    return sum(x > 0 for x in m) / len(m)


def answer_nll(model, tok, ts, ask: str | None = None) -> float:
    """Mean held-out negative log-likelihood (nats) of the asked-for answer plus EOS: a smooth
    measure of the SFT skill (a rate on 40 items moves in steps of 0.025)."""
    ask = ask or SFT_ASK
    model.eval()
    return -sum(completion_logp(model, tok, [{"role": "user", "content": f"{ask}:" + ",".join(t)}], t[_POS[ask]])
                for t in ts) / len(ts)


# the stages' train.* settings in the tests (measured: scripts/learning_margins.py; see tests/test_align.py)
# long enough that SFT leaves its plateau and DPO's effect saturates on every machine and version measured
# (tests/test_align.py: with 300 / 150 steps one floors run stayed on the plateau and DPO barely moved)
SFT_TRAIN = {"max_steps": 600, "lr": 3e-3, "lr_scheduler": "constant_with_warmup"}
DPO_TRAIN = {"max_steps": 300, "lr": 2e-3}

# a micro BitNet pretrained on builtin:pydoc for the alignment pipeline (tests and the margins script)
MICRO = """\
inherit: tiny
hidden_size: 128
intermediate_size: 256
num_hidden_layers: 2
num_attention_heads: 4
num_key_value_heads: 2
max_position_embeddings: 128
"""


def pretrain_micro(d: Path, seed: int = 0, steps: int = 40) -> Path:
    from bitnet_train.recipe import load_recipe
    from bitnet_train.training.pretrain import PretrainRecipe, pretrain

    (d / "micro.yaml").write_text(MICRO)
    r = load_recipe(PretrainRecipe, data={
        "output_dir": str(d / "pre"), "seed": seed, "model": str(d / "micro.yaml"),
        "data": {"path": "builtin:pydoc", "tokenizer": "bpe:1024", "seq_len": 64, "val_tokens": 2048},
        "train": {"max_steps": steps, "save_every": 1000, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5,
                  "min_lr": 3e-4, "eval_every": 0, "eval_batches": 1}})
    pretrain(r, progress=False)
    return d / "pre" / "final"


def run_pipeline(d: Path, pre: Path, seed: int, sft: dict, dpo: dict) -> dict:
    """pretrain -> `bitnet-train sft` -> `bitnet-train dpo` through the CLI with the shipped tiny
    recipes and --set overrides (``sft``/``dpo``: train.* keys); the task's figures at each stage."""
    from transformers import AutoTokenizer

    from bitnet_train.cli import main as cli
    from bitnet_train.modeling.models import load_model

    repo = Path(__file__).resolve().parents[1]
    tok = AutoTokenizer.from_pretrained(pre)
    ts = triples(task_words(tok))
    held, train = split(ts)
    write_jsonl(sft_rows(train), d / "sft.jsonl")
    write_jsonl(dpo_rows(train), d / "dpo.jsonl")
    res = {"held": held, "tok": tok, "dir": d}
    m = load_model(pre)
    res["em_pre"], res["nll_pre"] = exact_match(m, tok, held), answer_nll(m, tok, held)
    common = ["--set", f"seed={seed}", "--set", "train.eval_every=0", "--set", "train.save_every=1000",
              "--set", "data.eval_rows=0", "--set", "train.log_every=10"]
    for stage, model, keys in (("sft", pre, sft), ("dpo", d / "sft" / "final", dpo)):
        argv = [stage, str(repo / f"recipes/{stage}-tiny.yaml"), "--no-progress", "--set", f"model={model}",
                "--set", f"output_dir={d / stage}", "--set", f"data.path={d / f'{stage}.jsonl'}", *common]
        for k, v in keys.items():
            argv += ["--set", f"train.{k}={v}"]
        assert cli(argv) == 0, stage
        out = load_model(d / stage / "final")
        if stage == "sft":
            res["em_sft"], res["nll_sft"] = exact_match(out, tok, held), answer_nll(out, tok, held)
            m = preference_margins(out, tok, held)  # accuracy and mean margin from one pass
            res["pref_sft"], res["margin_sft"] = sum(x > 0 for x in m) / len(m), sum(m) / len(m)
        else:
            m = preference_margins(out, tok, held)
            res["pref_dpo"], res["margin_dpo"] = sum(x > 0 for x in m) / len(m), sum(m) / len(m)
    return res
