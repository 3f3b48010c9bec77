"""Pretraining: the loop learns, resume is exact, recipe errors name the key, stock transformers
loads the result. Tiny model (a preset YAML written in tmp_path) so that this stays fast on a CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_train.data import DataError, DataPosition, PackedData, resolve_files
from bitnet_train.recipe import RecipeError
from bitnet_train.train import load_pretrain_recipe, pretrain

REPO = Path(__file__).resolve().parents[1]

MICRO = """\
hidden_size: 64
intermediate_size: 128
num_hidden_layers: 2
num_attention_heads: 4
num_key_value_heads: 2
hidden_act: relu2
max_position_embeddings: 128
rope_theta: 10000.0
tie_word_embeddings: true
"""


def write_recipe(tmp: Path, data_path, **train) -> Path:
    (tmp / "micro.yaml").write_text(MICRO)
    t = {"max_steps": 40, "save_every": 20, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5,
         "min_lr": 3e-4, "eval_every": 20, "eval_batches": 4, **train}
    recipe = {
        "output_dir": str(tmp / "run"),
        "seed": 0,
        "model": str(tmp / "micro.yaml"),
        "data": {"path": str(data_path), "tokenizer": "bpe:512", "seq_len": 64, "val_fraction": 0.05},
        "train": t,
    }
    p = tmp / "recipe.yaml"
    p.write_text(json.dumps(recipe))  # JSON is YAML
    return p


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _shakespeare() -> Path:
    p = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    SHAKESPEARE = _shakespeare()
    tmp = tmp_path_factory.mktemp("learn")
    recipe = load_pretrain_recipe(
        write_recipe(tmp, SHAKESPEARE, max_steps=60, save_every=30, eval_every=30),
        ["wandb.enabled=true", "wandb.mode=offline"],
    )
    summary = pretrain(recipe, progress=False)
    return recipe, summary


def test_tiny_run_learns(trained):
    recipe, summary = trained
    out = Path(recipe.output_dir)
    m = read_metrics(out)
    vals = [r["val_loss"] for r in m if "val_loss" in r]
    steps = [r for r in m if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert all({"loss", "lr", "tokens", "tokens_per_s"} <= r.keys() for r in steps)
    assert vals[0] > 6.0  # ~ln(512) at init
    assert vals[-1] < vals[0] - 0.8, vals
    assert (out / "final" / "config.json").is_file()
    assert (out / "checkpoints" / "step-000060" / "optimizer.pt").is_file()
    # the loss-curve PNG, and the offline wandb run with the same steps
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_final_checkpoint_loads_in_stock_transformers(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitnet_train import load_checkpoint

    recipe, _ = trained
    final = Path(recipe.output_dir) / "final"
    stock = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_checkpoint(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("ROMEO: my lord", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = stock(ids).logits, ours(ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_resume_is_exact(tmp_path, shakespeare_path):
    common = ["train.max_steps=8", "train.save_every=3", "train.eval_every=4"]
    ra = load_pretrain_recipe(write_recipe(tmp_path, shakespeare_path), common + [f"output_dir={tmp_path}/a"])
    pretrain(ra, progress=False)
    rb = load_pretrain_recipe(write_recipe(tmp_path, shakespeare_path), common + [f"output_dir={tmp_path}/b"])
    s = pretrain(rb, progress=False, stop_after=4)  # like a SIGINT after step 4: saves step-000004
    assert s["interrupted"] and s["step"] == 4
    assert (tmp_path / "b" / "checkpoints" / "step-000004").is_dir()
    with pytest.raises(RecipeError, match="--resume"):
        pretrain(rb, progress=False)
    pretrain(rb, progress=False, resume=True)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)  # bitwise-equal losses, LRs and val losses
    assert len([r for r in a if "loss" in r]) == 8
    # keep_last=3 pruned the older checkpoints
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == [
        "step-000004", "step-000006", "step-000008"]


def test_recipe_unknown_key(tmp_path, shakespeare_path):
    p = write_recipe(tmp_path, shakespeare_path)
    with pytest.raises(RecipeError, match=r"recipe\.yaml.*unknown key 'train\.learning_rate'"):
        load_pretrain_recipe(p, ["train.learning_rate=1"])
    data = json.loads(p.read_text())
    data["data"]["shuffle"] = True
    p.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=r"recipe\.yaml: unknown key 'data\.shuffle'"):
        load_pretrain_recipe(p)


def test_recipe_bad_type_and_missing(tmp_path, shakespeare_path):
    p = write_recipe(tmp_path, shakespeare_path)
    with pytest.raises(RecipeError, match=r"recipe\.yaml: train\.max_steps: expected an integer"):
        load_pretrain_recipe(p, ["train.max_steps=lots"])
    with pytest.raises(RecipeError, match=r"quant: 'ternary' is not allowed"):
        load_pretrain_recipe(p, ["quant=ternary"])
    data = json.loads(p.read_text())
    del data["data"]["path"]
    p.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=r"recipe\.yaml: missing required key 'data\.path'"):
        load_pretrain_recipe(p)


def test_missing_data_path_names_it(tmp_path):
    r = load_pretrain_recipe(write_recipe(tmp_path, tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="nope.txt"):
        pretrain(r, progress=False)
    with pytest.raises(DataError, match="matches no files"):
        resolve_files(str(tmp_path / "*.jsonl"))


def test_cli_reports_errors(tmp_path):
    p = write_recipe(tmp_path, tmp_path / "nope.txt")
    exe = Path(sys.executable).with_name("bitnet-train")
    r = subprocess.run([str(exe), "pretrain", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "nope.txt" in r.stderr and "Traceback" not in r.stderr


def test_data_errors_and_formats(tmp_path):
    from bitnet_train.tokenizer import train_bpe

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        resolve_files(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.txt").write_bytes(b"hello \xff\xfe world\n")
    tok = train_bpe(["hello world"] * 10, vocab_size=300)
    with pytest.raises(DataError, match="bad.txt: not valid UTF-8"):
        next(PackedData(str(tmp_path / "bad.txt"), tok, 8, 0.0, 0).train_blocks(DataPosition()))
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} hello world"}) for i in range(50)))
    (d / "b.txt").write_text("plain text file\n" * 40)
    data = PackedData(str(d), tok, 8, 0.1, seed=1)
    pos = DataPosition()
    it = data.train_blocks(pos)
    first = [next(it) for _ in range(5)]
    assert all(len(b) == 9 for b in first) and pos.taken == 5
    # a fresh iterator from the saved position continues exactly where the first left off
    nxt = next(it)
    again = next(data.train_blocks(DataPosition(0, 5)))
    assert nxt == again
    from bitnet_train.data import iter_blocks

    every = sum(iter_blocks(str(d), tok, 9), [])
    assert every.count(tok.eos_token_id) >= 50  # 50 JSON lines + 1 text file end in EOS (the tail block may be cut)
    assert data.validation(2)
    assert resolve_files("builtin:pydoc") == "builtin:pydoc"


def test_non_finite_loss_names_the_step(tmp_path, shakespeare_path, monkeypatch):
    import torch
    import torch.nn.functional as F

    from bitnet_train.train import TrainingError

    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real(*a, **k) * torch.tensor(float("nan")))
    r = load_pretrain_recipe(write_recipe(tmp_path, shakespeare_path), ["train.eval_every=0"])
    with pytest.raises(TrainingError, match="non-finite loss nan at step 1"):
        pretrain(r, progress=False)


def test_sigterm_saves_and_resume_continues(tmp_path, shakespeare_path):
    import signal
    import time

    p = write_recipe(tmp_path, shakespeare_path, max_steps=100000, save_every=1000, eval_every=0)
    exe = str(Path(sys.executable).with_name("bitnet-train"))
    proc = subprocess.Popen([exe, "pretrain", str(p), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and "stopped at step" in err
    step = int(ckpts[0].name.split("-")[1])
    assert step >= 3
    r = subprocess.run([exe, "pretrain", str(p), "--resume", "--no-progress", "--set", f"train.max_steps={step + 2}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    steps = [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert steps == list(range(1, step + 3))
