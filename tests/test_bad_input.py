"""Bad input ends in one line naming the file (and the line), exit status 2, no traceback, and
nothing written: through the real CLI in a subprocess, as a user meets it."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*argv, cwd=None):
    r = subprocess.run([sys.executable, "-c", "import sys; from bitnet_train.cli import main; sys.exit(main())", *map(str, argv)], capture_output=True, text=True,
                       cwd=cwd or REPO, timeout=600)
    return r.returncode, r.stderr


def assert_clean_error(rc, err, *needles):
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    for n in needles:
        assert str(n) in err, (n, err[-3000:])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny BitNet checkpoint with a tokenizer (random init is enough: nothing here trains)."""
    import bitnet_train
    from bitnet_train.data.tokenizer import train_bpe
    from conftest import SHAKESPEARE

    text = SHAKESPEARE.read_text()[:60_000]
    tok = train_bpe([text[i: i + 4096] for i in range(0, len(text), 4096)], vocab_size=512)
    d = tmp_path_factory.mktemp("bad") / "ckpt"
    m = bitnet_train.build_model("tiny-silu", seed=0, vocab_size=len(tok))
    bitnet_train.save_checkpoint(m, d, tokenizer=tok)
    return d


def test_truncated_safetensors_in_export(ckpt, tmp_path):
    import shutil

    bad = tmp_path / "ck"
    shutil.copytree(ckpt, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5])  # shorter than the 8-byte header length
    for fmt in ("hf", "gguf"):
        out = tmp_path / f"out-{fmt}"
        rc, err = cli("export", bad, "--format", fmt, "--out", out, "--no-verify", "--no-progress")
        assert_clean_error(rc, err, f, "safetensors")
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{fmt}")]
    f.write_bytes(ckpt.joinpath("model.safetensors").read_bytes()[:-1000])  # header intact, data cut
    rc, err = cli("export", bad, "--format", "hf", "--out", tmp_path / "out2", "--no-verify", "--no-progress")
    assert_clean_error(rc, err, f)
    assert not (tmp_path / "out2").exists()
    from bitnet_train.checkpoint.format import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match="not a readable safetensors file"):  # loading it names it too
        load_checkpoint(bad)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_align_jsonl_with_a_bad_line(stage, ckpt, tmp_path):
    rows = (REPO / f"recipes/data/{stage}-tiny.jsonl").read_text().splitlines()[:5]
    data = tmp_path / f"{stage}.jsonl"
    data.write_text("\n".join(rows[:3] + ['{"prompt": "unterminated'] + rows[3:]) + "\n")
    out = tmp_path / "run"
    rc, err = cli(stage, REPO / f"recipes/{stage}-tiny.yaml", "--no-progress", "--set", f"model={ckpt}",
                  "--set", f"output_dir={out}", "--set", f"data.path={data}")
    assert_clean_error(rc, err, f"{data}:4", "not valid JSON")
    assert not out.exists()
    data.write_text("\n".join(rows[:2] + ["[1, 2]"]) + "\n")  # JSON, but not a row
    rc, err = cli(stage, REPO / f"recipes/{stage}-tiny.yaml", "--no-progress", "--set", f"model={ckpt}",
                  "--set", f"output_dir={out}", "--set", f"data.path={data}")
    assert_clean_error(rc, err, f"{data}:3", "JSON object")
    assert not out.exists()


def test_pretrain_jsonl_with_a_bad_line(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "a first document"}\n{"text": "second"\n')
    from test_pretrain import write_recipe

    recipe = write_recipe(tmp_path, data, max_steps=1, eval_every=0)
    rc, err = cli("pretrain", recipe, "--no-progress")
    assert_clean_error(rc, err, f"{data}:2", "not valid JSON")


def test_corrupt_training_state_on_resume(tmp_path):
    from test_pretrain import write_recipe
    from conftest import SHAKESPEARE

    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE.read_text()[:30_000])
    recipe = write_recipe(tmp_path, small, max_steps=2, save_every=2, eval_every=0)
    assert cli("pretrain", recipe, "--no-progress")[0] == 0
    (ck,) = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    final = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    for name, what in (("optimizer.pt", "optimizer state"), ("rng.pt", "random number generator state"),
                       ("trainer_state.json", "training state")):
        f = ck / name
        good = f.read_bytes()
        f.write_bytes(good[: len(good) // 2])
        rc, err = cli("pretrain", recipe, "--no-progress", "--resume", "--set", "train.max_steps=4")
        assert_clean_error(rc, err, f, what)
        f.write_bytes(good)
    # nothing was written by the refused resumes: the same checkpoints, the same final/
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [ck.name]
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == final


def test_generate_on_a_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_text("this is not a GGUF file\n")
    rc, err = cli("generate", f, "--prompt", "hello")
    assert_clean_error(rc, err, f, "not a GGUF file")
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00")  # the magic, then nothing: truncated
    rc, err = cli("generate", f, "--prompt", "hello")
    assert rc == 2 and "Traceback" not in err and str(f) in err, err[-3000:]
