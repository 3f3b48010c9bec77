"""Data pipeline throughput against what the trainer consumes, measured in one process.

    python scripts/bench_data.py [--data PATH] [--model tiny] [--seq-len 128] [--batch-size 16]

1. the trainer: optimizer steps of the model (forward, backward, AdamW) on random token batches,
   tokens/s (the first steps are warm-up and not timed), timed before and after the data paths
   (the ratios use the faster run, so a busy machine cannot flatter them);
2. the streaming path (``PackedData``: read, tokenize, pack, shuffle, in lanes);
3. ``bitnet-train tokenize`` (writing the shards), then the shard path (``ShardData``: memory-map,
   permuted blocks).

Both data paths are timed the way the loop uses them: ``batch_size`` blocks from
``train_blocks`` turned into one ``torch.long`` tensor per micro-batch (the loop's ``_next_batch``). Prints tokens/s and the
ratio data / trainer for each path (goal: at least 5x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the full 1.1 MB corpus beside the repository when there, else the 300 KB excerpt the tests use
SHAKESPEARE = next(p for p in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                              REPO / "tests" / "data" / "tinyshakespeare.txt") if p.is_file() or "tests" in p.parts)


def time_data(data, batch_size: int, min_tokens: int, min_seconds: float) -> tuple[float, int]:
    from bitnet_train.data.block_order import DataPosition
    from bitnet_train.training.loop import _next_batch

    it = data.train_blocks(DataPosition())
    _next_batch(it, batch_size, "cpu")  # opens the files, first tokenizer call
    n = 0
    t0 = time.perf_counter()
    while n < min_tokens or time.perf_counter() - t0 < min_seconds:
        x = _next_batch(it, batch_size, "cpu")
        n += x[:, 1:].numel()
    return n / (time.perf_counter() - t0), n


def time_trainer(model_name: str, vocab: int, seq_len: int, batch_size: int, steps: int, warmup: int) -> float:
    import torch
    import torch.nn.functional as F

    from bitnet_train.modeling.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name, quant="bitnet", seed=0, vocab_size=vocab).to(device).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = None
    for s in range(warmup + steps):
        if s == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(device)
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size * seq_len / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHAKESPEARE) if SHAKESPEARE.is_file() else "builtin:pydoc",
                    help="any data.path (default: tinyshakespeare.txt if present, else builtin:pydoc)")
    ap.add_argument("--tokenizer", default="bpe:2048")
    ap.add_argument("--model", default="tiny", help="model preset for the trainer side")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed trainer steps")
    ap.add_argument("--min-tokens", type=int, default=1_000_000, help="tokens each data path hands out, at least")
    ap.add_argument("--min-seconds", type=float, default=3.0)
    args = ap.parse_args()
    from bench_harness import machine_line

    print(machine_line(), flush=True)

    import torch

    from bitnet_train.data.config import DataConfig, make_tokenizer
    from bitnet_train.data.stream import PackedData
    from bitnet_train.data.shards import ShardData, write_token_dir

    cfg = DataConfig(path=args.data, tokenizer=args.tokenizer, seq_len=args.seq_len)
    tok = make_tokenizer(cfg)
    threads = torch.get_num_threads()
    print(f"data {args.data}, tokenizer {args.tokenizer} ({len(tok)} tokens), seq_len {args.seq_len}, "
          f"batch {args.batch_size}, torch threads {threads}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")

    train_tps = time_trainer(args.model, len(tok), args.seq_len, args.batch_size, args.steps, warmup=2)
    print(f"trainer ({args.model}, bitnet, fwd+bwd+AdamW): {train_tps:12,.0f} tokens/s  (before the data paths)")

    stream = PackedData(args.data, tok, args.seq_len, seed=0)
    s_tps, s_n = time_data(stream, args.batch_size, args.min_tokens, args.min_seconds)
    print(f"streaming path (PackedData):        {s_tps:12,.0f} tokens/s  {s_tps / train_tps:7.1f}x the trainer  ({s_n:,} tokens)")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        idx = write_token_dir(args.data, tok, Path(tmp) / "tok", tokenizer_spec=args.tokenizer)
        tk_tps = idx["total_tokens"] / (time.perf_counter() - t0)
        print(f"bitnet-train tokenize (writing):    {tk_tps:12,.0f} tokens/s  ({idx['total_tokens']:,} tokens, {idx['dtype']})")
        shards = ShardData(Path(tmp) / "tok", tok, args.seq_len, seed=0)
        h_tps, h_n = time_data(shards, args.batch_size, args.min_tokens, args.min_seconds)
        print(f"shard path (ShardData):             {h_tps:12,.0f} tokens/s  {h_tps / train_tps:7.1f}x the trainer  ({h_n:,} tokens)")
    again = time_trainer(args.model, len(tok), args.seq_len, args.batch_size, args.steps, warmup=2)
    print(f"trainer, again:                     {again:12,.0f} tokens/s  (after; the ratios use the faster of the two)")
    if again > train_tps:
        train_tps = again
        print(f"streaming path / trainer {s_tps / train_tps:.1f}x, shard path / trainer {h_tps / train_tps:.1f}x")
    ok = min(s_tps, h_tps) >= 5 * train_tps
    print(f"goal >= 5x the trainer: {'met' if ok else 'NOT met'} (streaming {s_tps / train_tps:.1f}x, shards {h_tps / train_tps:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
