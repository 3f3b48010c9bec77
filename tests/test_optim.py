"""bitnet_train/training/optim.py: AdamW's state made before the first forward changes no bit of training."""

from __future__ import annotations

import copy

import pytest
import torch

import bitnet_train
from bitnet_train.training.optim import build_optimizer, init_adamw_state


def _train(model, opt, steps=3):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _assert_same(m_a, o_a, m_b, o_b):
    for (name, a), b in zip(m_a.named_parameters(), m_b.parameters()):
        assert torch.equal(a, b), name
    sa, sb = o_a.state_dict(), o_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k, v in sa["state"][i].items():
            assert v.dtype == sb["state"][i][k].dtype and torch.equal(v, sb["state"][i][k]), (i, k)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_eager_state_trains_the_same_bits(amsgrad):
    lazy_model = bitnet_train.build_model("tiny", seed=0, num_hidden_layers=1, backend="torch")
    eager_model = copy.deepcopy(lazy_model)
    lazy = build_optimizer(lazy_model, 3e-3, 0.1)
    eager = build_optimizer(eager_model, 3e-3, 0.1)
    for o in (lazy, eager):
        for g in o.param_groups:
            g["amsgrad"] = amsgrad
    n = sum(1 for p in eager_model.parameters() if p.requires_grad)
    assert init_adamw_state(eager) == n
    st = eager.state[eager_model.model.embed_tokens.weight]
    assert float(st["step"]) == 0 and not st["exp_avg"].any() and ("max_exp_avg_sq" in st) == amsgrad
    assert len(lazy.state) == 0
    _train(lazy_model, lazy)
    _train(eager_model, eager)
    _assert_same(lazy_model, lazy, eager_model, eager)
    # the state is there now: nothing to make, nothing changed
    before = copy.deepcopy(eager.state_dict()["state"])
    assert init_adamw_state(eager) == 0
    after = eager.state_dict()["state"]
    assert before.keys() == after.keys()
    assert all(torch.equal(v, after[i][k]) for i in before for k, v in before[i].items())


def test_frozen_parameters_and_other_optimizers_are_left_alone():
    model = bitnet_train.build_model("tiny", seed=0, num_hidden_layers=1, quant="none")
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    made = init_adamw_state(opt)
    assert made == sum(1 for p in model.parameters() if p.requires_grad) and model.model.embed_tokens.weight not in opt.state
    assert init_adamw_state(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) == 0
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    assert init_adamw_state(fused) == 0 and len(fused.state) == 0


def test_pretrain_makes_the_state_up_front_and_trains_the_same_bits(tmp_path, shakespeare_path, monkeypatch):
    """pretrain() (fresh) makes AdamW's state before the first step; with the state left to the first
    step instead, every loss, learning rate and validation loss is the same."""
    import bitnet_train.training.optim as optim
    from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain
    from test_pretrain import read_metrics, write_recipe

    made = []
    real = optim.init_adamw_state
    monkeypatch.setattr(optim, "init_adamw_state", lambda opt: made.append(real(opt)) or made[-1])
    common = ["train.max_steps=4", "train.save_every=4", "train.eval_every=2"]
    pretrain(load_pretrain_recipe(write_recipe(tmp_path, shakespeare_path), common + [f"output_dir={tmp_path}/eager"]),
             progress=False)
    assert len(made) == 1 and made[0] > 0
    monkeypatch.setattr(optim, "init_adamw_state", lambda opt: 0)  # lazy: torch makes it in step 1
    pretrain(load_pretrain_recipe(write_recipe(tmp_path, shakespeare_path), common + [f"output_dir={tmp_path}/lazy"]),
             progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    a, b = strip(read_metrics(tmp_path / "eager")), strip(read_metrics(tmp_path / "lazy"))
    assert len([r for r in a if "loss" in r]) == 4 and a == b
