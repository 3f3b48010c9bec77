"""scripts/quality_curves.py: results per LR, best LR per quant, the gap best vs best; docs/quality.md is what
``plot`` writes from docs/quality/*.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scriptload import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qc():
    return load_script("quality_curves")


def _result(size, quant, lr, bpbs, ppl=None):
    return {"size": size, "quant": quant, "lr": lr, "min_lr": lr / 10, "seed": 0, "data": "x.txt",
            "held_out_chars": 100, "train_chars": 1000, "steps": 20 * len(bpbs), "threads": 2, "params": 3.5e6,
            "non_embedding_params": 3e6, "train_seconds": 1.0, "eval_seconds": 1.0, "train_tokens_per_s": 10.0,
            "points": [{"step": 20 * (i + 1), "tokens": 2048 * 20 * (i + 1), "bits_per_byte": b,
                        "perplexity": ppl or 2 ** b, "eval_tokens": 50} for i, b in enumerate(bpbs)]}


def _write(qc, d: Path, r: dict) -> Path:
    f = qc.result_file(d, r["size"], r["quant"], r["lr"])
    f.write_text(json.dumps(r))
    return f


def test_lr_tag(qc):
    assert [qc.lr_tag(x) for x in (3e-3, 1e-3, 6e-3, 2.5e-4, 1e-2)] == ["3e-3", "1e-3", "6e-3", "2.5e-4", "1e-2"]
    assert qc.result_file(Path("r"), "tiny", "none", 1e-3) == Path("r/tiny-none-lr1e-3.json")


def test_best_lr_per_quant_and_the_gap_best_vs_best(qc, tmp_path):
    # full precision is better at 1e-3 than at 3e-3; BitNet has only 3e-3
    _write(qc, tmp_path, _result("tiny", "bitnet", 3e-3, [3.0, 2.60], ppl=120.0))
    _write(qc, tmp_path, _result("tiny", "none", 3e-3, [3.0, 2.65], ppl=125.0))
    _write(qc, tmp_path, _result("tiny", "none", 1e-3, [3.1, 2.50], ppl=100.0))
    runs = qc.load_results(tmp_path)
    assert set(runs) == {("tiny", "bitnet", 3e-3), ("tiny", "none", 3e-3), ("tiny", "none", 1e-3)}
    best = qc.best_runs(runs)
    assert best["tiny", "none"][0] == 1e-3 and best["tiny", "bitnet"][0] == 3e-3
    t = qc.table(runs)
    # every run is a row, with its LR; the best of two is marked
    assert "| full precision | 1e-3 (best) | 2.5000 |" in t
    assert "| full precision | 3e-3 | 2.6500 |" in t
    assert "| BitNet b1.58 | 3e-3 | 2.6000 |" in t
    # the gap: BitNet 2.60 at 3e-3 against fp 2.50 at 1e-3 (not the 2.65 of fp at 3e-3)
    assert "| tiny | 3e-3 | 1e-3 | +0.1000 | +4.00% | 1.200 |" in t
    md = qc.page(runs, "q.png")
    assert "--only tiny/none --lr 1e-3 --steps 40" in md and "--only tiny/none --steps 40" in md


def test_a_misnamed_or_broken_result_is_an_error_naming_it(qc, tmp_path):
    r = _result("tiny", "none", 1e-3, [2.5])
    (tmp_path / "tiny-none-lr3e-3.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit, match=r"tiny-none-lr3e-3\.json: holds tiny/none at lr 0\.001; expected the name "
                                         r"tiny-none-lr1e-3\.json"):
        qc.load_results(tmp_path)
    (tmp_path / "tiny-none-lr3e-3.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"tiny-none-lr3e-3\.json: not a quality_curves\.py result"):
        qc.load_results(tmp_path)
    (tmp_path / "tiny-none-lr3e-3.json").unlink()
    with pytest.raises(SystemExit, match="no results"):
        qc.load_results(tmp_path)


def test_the_committed_page_is_what_plot_writes(qc):
    runs = qc.load_results(REPO / "docs" / "quality")
    page = (REPO / "docs" / "quality.md").read_text(encoding="utf-8")
    assert qc.page(runs, "quality.png") == page, "docs/quality.md is stale: run python scripts/quality_curves.py plot"
