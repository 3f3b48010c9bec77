"""Pretraining data: parquet/arrow/hf: sources, token shards (bitnet-train tokenize), rank
sharding, exact resume, and clear errors for bad data. Tiny BPE tokenizers, local files only."""

import json
from pathlib import Path

import pytest

from bitnet_train.data.block_order import merge_positions
from bitnet_train.data.block_order import DataPosition
from bitnet_train.data.config import DataConfig, open_training_data
from bitnet_train.data.documents import iter_documents, resolve_files
from bitnet_train.data.stream import PackedData, iter_blocks
from bitnet_train.errors import DataError
from bitnet_train.data.shards import ShardData, read_index, tokenizer_fingerprint, write_token_dir

DOCS = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 53}" for j in range(5 + i % 11)) for i in range(300)]


@pytest.fixture(scope="module")
def tok():
    from bitnet_train.data.tokenizer import train_bpe

    return train_bpe(DOCS, vocab_size=300)


def write_parquet(path: Path, texts, row_group_size=64, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)
    return path


def take(it, n):
    """``n`` blocks as lists of ints (the token shards hand out numpy views of the memory map)."""
    return [b.tolist() if hasattr(b, "tolist") else b for b in (next(it) for _ in range(n))]


# ----------------------------------------------------------------------------- sources


def test_parquet_reads_by_batches_and_counts_null_skips(tmp_path, tok):
    texts = list(DOCS)
    texts[5] = None
    texts[77] = None
    write_parquet(tmp_path / "a.parquet", texts, row_group_size=50)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    got = list(iter_documents(str(tmp_path / "a.parquet")))
    assert got == [t for t in texts if t is not None]
    # the same documents give the same blocks, whatever the file format
    pq_blocks = list(iter_blocks(str(tmp_path / "a.parquet"), tok, 17))
    js_blocks = list(iter_blocks(str(tmp_path / "a.jsonl"), tok, 17))
    assert pq_blocks == js_blocks and len(pq_blocks) > 50
    data = PackedData(str(tmp_path / "a.parquet"), tok, 16, seed=0, lanes=1)
    it = data.train_blocks(DataPosition())
    assert sorted(take(it, len(pq_blocks))) == sorted(pq_blocks)  # the whole first epoch, shuffled
    assert data.skips.total == 2 and "a.parquet: 2 record(s)" in data.skips.report()


def test_parquet_and_arrow_errors_name_the_file_and_column(tmp_path, tok):
    import pyarrow as pa

    write_parquet(tmp_path / "p.parquet", DOCS[:10], column="content")
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns: content, id\); set data\.text_field"):
        list(iter_documents(str(tmp_path / "p.parquet")))
    assert list(iter_documents(str(tmp_path / "p.parquet"), text_field="content")) == DOCS[:10]
    with pytest.raises(DataError, match=r"p\.parquet: column 'id' holds int64, not text"):
        list(iter_documents(str(tmp_path / "p.parquet"), text_field="id"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        list(iter_documents(str(tmp_path / "junk.parquet")))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow either, sorry")
    with pytest.raises(DataError, match=r"junk\.arrow: not an Arrow IPC file or stream"):
        list(iter_documents(str(tmp_path / "junk.arrow")))
    table = pa.table({"body": DOCS[:5]})
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError, match=r"f\.arrow: no column 'text' \(columns: body\)"):
        list(iter_documents(str(tmp_path / "f.arrow")))


def test_arrow_ipc_file_and_datasets_cache(tmp_path):
    import datasets
    import pyarrow as pa

    d = tmp_path / "corpus"
    d.mkdir()
    table = pa.table({"text": DOCS[:40]})
    with pa.OSFile(str(d / "a.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        for b in table.to_batches(max_chunksize=16):
            w.write_batch(b)
    # what datasets writes (Arrow IPC *stream* format), found by walking the directory
    datasets.Dataset.from_dict({"text": DOCS[40:90], "n": list(range(50))}).save_to_disk(str(d / "saved"))
    files = resolve_files(str(d))
    assert [f.suffix for f in files] == [".arrow", ".arrow"]
    assert list(iter_documents(str(d))) == DOCS[:90]


def test_hf_datasets_streaming_on_local_files(tmp_path, tok, monkeypatch):
    import datasets

    d = tmp_path / "ds"
    d.mkdir()
    write_parquet(d / "train-00000.parquet", DOCS[:150])
    write_parquet(d / "train-00001.parquet", DOCS[150:])
    write_parquet(tmp_path / "all.parquet", DOCS)
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    spec = f"hf:{d}"
    assert list(iter_documents(spec)) == DOCS
    assert calls and calls[0][1]["streaming"] is True and calls[0][1]["split"] == "train"
    assert list(iter_blocks(spec, tok, 33)) == list(iter_blocks(str(tmp_path / "all.parquet"), tok, 33))
    with pytest.raises(DataError, match=r"hf:.*\(split 'train'\): no field 'body' \(fields: text, id\)"):
        list(iter_documents(spec, text_field="body"))
    with pytest.raises(DataError, match=r"cannot open the dataset \(split 'validation'\)"):
        list(iter_documents(spec, split="validation"))


def test_hf_path_is_not_opened_before_training(tmp_path, monkeypatch, tok):
    import datasets

    from bitnet_train.recipe import RecipeError, build

    def boom(*a, **k):
        raise AssertionError("load_dataset called at validation time")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    cfg = build(DataConfig, {"path": "hf:HuggingFaceFW/fineweb-edu:sample-10BT", "split": "train"})
    assert cfg.path.endswith(":sample-10BT")
    data = open_training_data(cfg, tok, seed=0)  # constructing the reader opens nothing
    assert isinstance(data, PackedData)
    with pytest.raises(RecipeError, match=r"expected hf:<dataset>"):
        build(DataConfig, {"path": "hf:"})


def test_bad_local_data(tmp_path, tok):
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="empty.parquet: file is empty"):
        resolve_files(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_files(str(tmp_path / "*.arrow"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    with pytest.raises(DataError, match="holds no .txt/.jsonl/.json/.parquet/.arrow files"):
        resolve_files(str(tmp_path / "d"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' is not a string"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


# ----------------------------------------------------------------------------- ranks and resume (streaming)


def test_streaming_ranks_are_disjoint_and_positions_agree(tmp_path, tok):
    write_parquet(tmp_path / "a.parquet", DOCS)
    spec = str(tmp_path / "a.parquet")
    one = PackedData(spec, tok, 16, seed=3, lanes=6)
    p1 = DataPosition()
    ref = take(one.train_blocks(p1), 60)
    for w in (2, 3, 4):  # 6 lanes: 2 and 3 ranks read disjoint lanes; 4 ranks share them in pairs
        poss, got = [], []
        for r in range(w):
            p = DataPosition()
            data = PackedData(spec, tok, 16, seed=3, lanes=6, rank=r, world_size=w)
            assert data.mine == [x for x in range(6) if x % (2 if w == 4 else w) == r % (2 if w == 4 else w)]
            got.append(take(data.train_blocks(p), 60 // w))
            poss.append(p.to_dict())
        assert [got[k % w][k // w] for k in range(60)] == ref  # the global order is the same at any world size
        assert {p["taken"] for p in poss} == {60}
        merged = merge_positions(poss)
        assert merged == json.loads(json.dumps(p1.to_dict()))  # the ranks' lane states make the one-process position
    # resume the 4 ranks as 3 from the merged position: the next blocks of the same order
    nxt = take(one.train_blocks(p1), 12)
    got = [take(PackedData(spec, tok, 16, seed=3, lanes=6, rank=r, world_size=3).train_blocks(
        DataPosition.from_dict(merged)), 4) for r in range(3)]
    assert [got[k % 3][k // 3] for k in range(12)] == nxt


def test_stream_resume_seeks_and_validation_is_never_trained_on(tmp_path, tok, monkeypatch):
    import bitnet_train.data.stream as stream

    monkeypatch.setattr(stream, "CHUNK_BLOCKS", 16)  # several chunks per lane
    write_parquet(tmp_path / "a.parquet", DOCS, row_group_size=37)
    spec = str(tmp_path / "a.parquet")
    data = PackedData(spec, tok, 16, seed=5, val_tokens=300, lanes=1)
    held = data.validation()
    k = held.documents
    assert held.tokens >= 300 and 0 < k < 40 and held.n_bytes == sum(len(d.encode()) for d in DOCS[:k])
    write_parquet(tmp_path / "rest.parquet", DOCS[k:])
    epoch = list(iter_blocks(str(tmp_path / "rest.parquet"), tok, 17))  # what one epoch must train on
    pos = DataPosition()
    straight = take(data.train_blocks(pos), len(epoch) + 10)  # crosses into epoch 1
    assert sorted(straight[: len(epoch)]) == sorted(epoch) and straight[: len(epoch)] != epoch  # each once, shuffled
    assert pos.lanes["0"]["epoch"] == 1
    reads = []
    for stop in (7, len(epoch) - 1, len(epoch) + 3):
        p = DataPosition()
        first = take(data.train_blocks(p), stop)
        reads.clear()
        again = PackedData(spec, tok, 16, seed=5, val_tokens=300, lanes=1)
        assert again.validation().windows == held.windows  # reads the held-out documents (from unit 0), once
        real = again._lane_pieces
        reads.clear()
        again._lane_pieces = lambda lane, cursor, *a, **k: reads.append(cursor["u"]) or real(lane, cursor, *a, **k)
        rest = take(again.train_blocks(DataPosition.from_dict(json.loads(json.dumps(p.to_dict())))),
                    len(epoch) + 10 - stop)
        assert first + rest == straight
        assert reads[0] == p.lanes["0"]["cursor"]["u"] > 0  # seeks: reading starts at the saved record
    # lanes: the held-out documents are in no lane; every epoch-0 block of every lane is trained on once
    d3 = PackedData(spec, tok, 16, seed=5, val_tokens=300, lanes=3)
    assert d3._lane_range(0)[0] == data.train_start["u"] == k and d3.validation().windows == held.windows
    with pytest.raises(DataError, match="format of an older bitnet-train"):
        next(data.train_blocks(DataPosition(0, 12)))


def test_hf_stream_lanes_resume_from_datasets_state(tmp_path, tok, monkeypatch):
    import bitnet_train.data.stream as stream

    monkeypatch.setattr(stream, "CHUNK_BLOCKS", 8)
    d = tmp_path / "ds"
    d.mkdir()
    for i in range(2):
        write_parquet(d / f"train-0000{i}.parquet", DOCS[i * 150 : (i + 1) * 150])
    spec = f"hf:{d}"

    def reader(**kw):
        return PackedData(spec, tok, 16, seed=2, val_tokens=200, lanes=2, **kw)

    ref = take(reader().train_blocks(DataPosition()), 40)
    p = DataPosition()
    first = take(reader().train_blocks(p), 21)
    saved = json.loads(json.dumps(p.to_dict()))
    assert all(saved["lanes"][k]["cursor"]["s"] is not None for k in ("0", "1"))  # datasets' own state_dict()
    assert first + take(reader().train_blocks(DataPosition.from_dict(saved)), 19) == ref
    two = [take(reader(rank=r, world_size=2).train_blocks(DataPosition()), 20) for r in range(2)]
    assert [two[k % 2][k // 2] for k in range(40)] == ref
    held = reader().validation()
    assert held.tokens >= 200 and set(map(tuple, held.windows)).isdisjoint(map(tuple, ref))


# ----------------------------------------------------------------------------- token shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tok):
    tmp = tmp_path_factory.mktemp("shards")
    write_parquet(tmp / "a.parquet", DOCS)
    idx = write_token_dir(str(tmp / "a.parquet"), tok, tmp / "tok", tokenizer_spec="test-bpe", shard_tokens=1000, batch=32)
    return tmp, idx


def test_tokenize_writes_index_and_shards(shard_dir, tok):
    import numpy as np

    tmp, idx = shard_dir
    d = tmp / "tok"
    assert read_index(d)["total_tokens"] == idx["total_tokens"]
    assert idx["dtype"] == "uint16" and idx["documents"] == len(DOCS) and len(idx["shards"]) > 3
    assert idx["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    stream = np.concatenate([np.fromfile(d / s["file"], dtype="<u2") for s in idx["shards"]]).tolist()
    expected = sum((tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in DOCS), [])
    assert stream == expected
    # the saved tokenizer round-trips to the same fingerprint
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(d / "tokenizer")) == tokenizer_fingerprint(tok)


def test_shards_match_streaming_and_cover_each_block_once(shard_dir, tok):
    tmp, _ = shard_dir
    cfg = DataConfig(path=str(tmp / "tok"), tokenizer="test-bpe", seq_len=24, val_tokens=300)
    data = open_training_data(cfg, tok, seed=1)
    assert isinstance(data, ShardData)
    stream = PackedData(str(tmp / "a.parquet"), tok, 24, seed=1, val_tokens=300)
    held = data.validation()
    assert held.windows == stream.validation().windows and held.documents == stream.validation().documents
    k = held.documents  # the same whole documents held out on both paths
    write_parquet(tmp / "rest.parquet", DOCS[k:])
    every = list(iter_blocks(str(tmp / "rest.parquet"), tok, 25))
    assert data.n_blocks == len(every)
    pos = DataPosition()
    epoch0 = take(data.train_blocks(pos), data.n_train)
    assert pos.to_dict() == {"epoch": 0, "taken": data.n_train}
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, every))  # each block once; held-out tokens never
    assert epoch0 != every  # shuffled
    epoch1 = take(data.train_blocks(pos), data.n_train)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)


def test_shards_ranks_disjoint_and_resume_is_o1(shard_dir, tok):
    tmp, _ = shard_dir
    d = str(tmp / "tok")
    one = ShardData(d, tok, 24, seed=2)
    ref = take(one.train_blocks(DataPosition()), 3 * (one.n_train // 3) + 6)
    w = 3
    got, poss = [], []
    for r in range(w):
        p = DataPosition()
        got.append(take(ShardData(d, tok, 24, seed=2, rank=r, world_size=w).train_blocks(p), one.n_train // w + 2))
        poss.append(p.to_dict())
    assert len({json.dumps(p) for p in poss}) == 1 and poss[0] == {"epoch": 1, "taken": 6}
    rounds = one.n_train // w
    assert [got[k % w][k // w] for k in range(w * rounds)] == ref[: w * rounds]
    # by block index: each rank's entries of the permutation are its own
    perm = one.permutation(0)
    idx = [{int(perm[k * w + r]) for k in range(rounds)} for r in range(w)]
    assert sum(map(len, idx)) == len(set().union(*idx)) == w * rounds
    # resume from a saved position: a fresh reader jumps there and continues exactly
    p = DataPosition()
    first = take(one.train_blocks(p), 11)
    again = ShardData(d, tok, 24, seed=2)
    assert take(again.train_blocks(DataPosition.from_dict(p.to_dict())), 5) == ref[11:16]
    assert first == ref[:11]


def test_block_permutation_is_a_seeded_bijection_in_constant_memory():
    import tracemalloc

    from bitnet_train.data.block_order import BlockPermutation

    for n in (0, 1, 2, 3, 4, 5, 17, 64, 65, 1000, 4097):  # powers of 4 and the sizes around them
        p = BlockPermutation(n, seed=3, epoch=1)
        assert len(p) == n and sorted(p) == list(range(n)), n  # every index exactly once
    a, b = list(BlockPermutation(1000, 3, 1)), list(BlockPermutation(1000, 3, 1))
    assert a == b  # deterministic from (n, seed, epoch)
    assert a != list(range(1000)) and a != list(BlockPermutation(1000, 4, 1)) and a != list(BlockPermutation(1000, 3, 2))
    # 4 T tokens of seq_len 2048 blocks: nothing proportional to n is built
    n = 4 * 10**12 // 2049
    tracemalloc.start()
    big = BlockPermutation(n, seed=0, epoch=0)
    got = [big[k] for k in range(0, n, n // 997)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20 and len(set(got)) == len(got) and all(0 <= v < n for v in got)
    with pytest.raises(IndexError):
        big[n]


def test_shard_blocks_are_memmap_views_and_batch_into_one_tensor(shard_dir, tok):
    import numpy as np
    import torch

    from bitnet_train.training.loop import _next_batch

    tmp, _ = shard_dir
    data = ShardData(tmp / "tok", tok, 24, seed=1)
    b = next(data.train_blocks(DataPosition()))
    assert isinstance(b, np.ndarray) and b.dtype == np.dtype("<u2") and b.shape == (25,)
    x = _next_batch(data.train_blocks(DataPosition()), 4, "cpu")
    ref = take(data.train_blocks(DataPosition()), 4)
    assert x.dtype == torch.long and x.tolist() == ref
    # the streaming reader's lists go through the same function
    assert _next_batch(iter(ref), 4, "cpu").tolist() == ref


def test_shards_uint32_and_any_seq_len(tmp_path, shard_dir, tok):
    src, idx16 = shard_dir
    idx = write_token_dir(str(src / "a.parquet"), tok, tmp_path / "t32", tokenizer_spec="x", dtype="uint32")
    assert idx["dtype"] == "uint32" and idx["total_tokens"] == idx16["total_tokens"] and len(idx["shards"]) == 1
    a = ShardData(tmp_path / "t32", tok, 50, seed=0, val_tokens=300)
    b = ShardData(src / "tok", tok, 50, seed=0, val_tokens=300)
    assert a.validation().windows == b.validation().windows and len(a.validation().windows[0]) == 51
    assert take(a.train_blocks(DataPosition()), 5) == take(b.train_blocks(DataPosition()), 5)
    with pytest.raises(DataError, match="uint16 cannot hold"):
        write_token_dir(str(src / "a.parquet"), type("T", (), {"__len__": lambda s: 70000, "eos_token_id": 1})(), tmp_path / "x",
                        tokenizer_spec="x", dtype="uint16")


def test_shard_tokenizer_mismatch_is_a_clear_error(shard_dir):
    from bitnet_train.data.shards import tokenizer_for_token_dir
    from bitnet_train.data.tokenizer import train_bpe

    tmp, _ = shard_dir
    other = train_bpe(DOCS[:50], vocab_size=280)
    with pytest.raises(DataError, match=r"tokenized with 'test-bpe' \(vocab 300, fingerprint [0-9a-f]{16}\), but the "
                                        r"recipe's tokenizer differs \(vocab 280"):
        ShardData(tmp / "tok", other, 24, seed=0)
    with pytest.raises(DataError, match=r"tokenized with 'test-bpe', but data.tokenizer is 'bpe:512'"):
        tokenizer_for_token_dir(tmp / "tok", "bpe:512")
    assert len(tokenizer_for_token_dir(tmp / "tok", "test-bpe")) == 300
    assert len(tokenizer_for_token_dir(tmp / "tok", str(tmp / "tok" / "tokenizer"))) == 300


def test_corrupt_token_dirs(tmp_path, shard_dir, tok):
    import shutil

    src, _ = shard_dir

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(src / "tok", d)
        return d

    d = fresh("badjson")
    (d / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"badjson/index\.json: corrupt index \(not valid JSON"):
        ShardData(d, tok, 24, seed=0)
    d = fresh("trunc")
    f = d / "shard-00001.bin"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"shard-00001\.bin: holds 1997 bytes but index\.json says 1000 uint16 tokens"):
        ShardData(d, tok, 24, seed=0)
    d = fresh("missing")
    (d / "shard-00002.bin").unlink()
    with pytest.raises(DataError, match=r"shard-00002\.bin: shard listed in index\.json is missing"):
        ShardData(d, tok, 24, seed=0)
    d = fresh("total")
    idx = json.loads((d / "index.json").read_text())
    idx["total_tokens"] += 1
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DataError, match=r"total_tokens .* is not the sum of the shards"):
        read_index(d)
    with pytest.raises(DataError, match="fewer than the 1 rank"):
        ShardData(src / "tok", tok, 100_000, seed=0)


def test_tokenize_cli(tmp_path, capsys):
    from bitnet_train.cli import main

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS))
    out = tmp_path / "tk"
    rc = main(["tokenize", str(tmp_path / "c.jsonl"), "--tokenizer", "bpe:300", "--out", str(out),
               "--text-field", "body", "--no-progress"])
    assert rc == 0
    assert "from 300 documents in 1 uint16 shard(s)" in capsys.readouterr().out
    assert read_index(out)["tokenizer"]["spec"] == "bpe:300" and (out / "tokenizer" / "tokenizer.json").is_file()
    assert main(["tokenize", str(tmp_path / "c.jsonl"), "--tokenizer", "bpe:300", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "c.jsonl:1: expected an object with a 'text' field" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written
    assert main(["tokenize", str(tmp_path / "none*.txt"), "--tokenizer", "bpe:300", "--out", str(tmp_path / "y")]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_pretrain_on_tokenized_dir_resumes_exactly(tmp_path, shakespeare_path):
    from bitnet_train.cli import main
    from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

    tk = tmp_path / "tk"
    assert main(["tokenize", str(shakespeare_path), "--tokenizer", "bpe:512", "--out", str(tk), "--no-progress",
                 "--shard-tokens", "50000"]) == 0
    (tmp_path / "micro.yaml").write_text(
        "hidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 1\nnum_attention_heads: 2\n"
        "num_key_value_heads: 1\nhidden_act: relu2\nmax_position_embeddings: 64\ntie_word_embeddings: true\n")
    recipe = {"seed": 0, "model": str(tmp_path / "micro.yaml"),
              "data": {"path": str(tk), "tokenizer": "bpe:512", "seq_len": 32, "val_tokens": 2048,
                       "val_path": str(shakespeare_path)},  # one .txt document: none ends after 2048 tokens
              "train": {"max_steps": 4, "save_every": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
                        "eval_batches": 2}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    a = load_pretrain_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path}/a"])
    b = load_pretrain_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path}/b"])
    pretrain(a, progress=False)
    assert pretrain(b, progress=False, stop_after=1)["interrupted"]
    pretrain(b, progress=False, resume=True)

    def rows(run):
        recs = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]

    assert rows("a") == rows("b") and len([r for r in rows("a") if "loss" in r]) == 4
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["data_position"] == {"epoch": 0, "taken": 16}
    bad = load_pretrain_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path}/c", "data.tokenizer=bpe:1024"])
    with pytest.raises(DataError, match="was tokenized with 'bpe:512'"):
        pretrain(bad, progress=False)


def test_missing_column_is_caught_when_the_reader_opens(tmp_path, tok):
    d = tmp_path / "c"
    d.mkdir()
    write_parquet(d / "a.parquet", DOCS[:20])
    write_parquet(d / "b.parquet", DOCS[20:40], column="content")
    with pytest.raises(DataError, match=r"b\.parquet: no column 'text' \(columns: content, id\)"):
        PackedData(str(d), tok, 16, seed=0)  # before a single block is read


def test_tokenize_with_worker_processes_is_identical(tmp_path, shard_dir, tok):
    src, idx1 = shard_dir
    idx2 = write_token_dir(str(src / "a.parquet"), tok, tmp_path / "w2", tokenizer_spec="test-bpe", shard_tokens=1000,
                           batch=32, workers=2)
    assert idx2["shards"] == idx1["shards"] and idx2["documents"] == idx1["documents"]
    for s in idx1["shards"]:
        assert (tmp_path / "w2" / s["file"]).read_bytes() == (src / "tok" / s["file"]).read_bytes()


def test_prefetch_keeps_order_raises_and_stops():
    import threading

    from bitnet_train.data.stream import prefetched

    assert list(prefetched(lambda: iter(range(1000)), 7)) == list(range(1000))

    def bad():
        yield 1
        raise DataError("x.txt: broken")

    it = prefetched(bad, 4)
    assert next(it) == 1
    with pytest.raises(DataError, match="x.txt: broken"):
        next(it)
    before = set(threading.enumerate())
    it = prefetched(lambda: iter(range(10**9)), 4)
    assert next(it) == 0
    mine = [t for t in threading.enumerate() if t not in before and t.name == "bitnet-train-data"]
    assert len(mine) == 1
    it.close()  # the consumer goes away: the producer thread ends
    mine[0].join(timeout=5)
    assert not mine[0].is_alive()


def test_tokenize_hf_source_and_resume_with_other_world_size(tmp_path, tok):
    from bitnet_train.cli import main

    d = tmp_path / "ds"
    d.mkdir()
    write_parquet(d / "train-00000.parquet", DOCS)
    tok.save_pretrained(tmp_path / "tokdir")
    assert main(["tokenize", f"hf:{d}", "--tokenizer", str(tmp_path / "tokdir"), "--out", str(tmp_path / "tk"),
                 "--no-progress"]) == 0
    assert read_index(tmp_path / "tk")["documents"] == len(DOCS)
    one = ShardData(tmp_path / "tk", tok, 16, seed=4)
    ref = take(one.train_blocks(DataPosition()), 20)
    # 2 ranks trained 3 rounds (position 6), then the run resumes on 4 ranks
    p = [DataPosition(), DataPosition()]
    for r in range(2):
        take(ShardData(tmp_path / "tk", tok, 16, seed=4, rank=r, world_size=2).train_blocks(p[r]), 3)
    assert p[0] == p[1] == DataPosition(0, 6)
    nxt = [take(ShardData(tmp_path / "tk", tok, 16, seed=4, rank=r, world_size=4).train_blocks(DataPosition(0, 6)), 2)
           for r in range(4)]
    assert [nxt[k % 4][k // 4] for k in range(8)] == ref[6:14]
