"""Startup and resume of the streaming reader against corpus size, data position and world size.

    python scripts/bench_startup.py [--sizes 10,100,1000] [--worlds 1,8] [--dir /tmp/bench-startup]

Synthetic ``.jsonl`` corpora of the given sizes in MB are generated into ``--dir`` (not the
repository) once, with a byte-level BPE trained on 2 MB of the smallest. Each measurement runs in
a fresh process (so its peak RSS is its own) as rank 0 of a simulated world (``PackedData(rank=0,
world_size=N)``), with the 125m recipe's data settings (``seq_len`` 1024, ``val_tokens`` 1,048,576,
``lanes`` 64, 16 sequences per micro-batch): the time from constructing the reader to holding the
validation windows and the first micro-batch as a tensor, and the process's peak RSS. "late" is a
resume at a position near the end of the corpus: every lane's cursor 90% through its share of the
corpus, at the start of its chunk 1000 (a written position: what it costs to
resume does not depend on how it was reached). Then the data path's tokens/s per rank (rank 0 of
1 and of 8; blocks into tensors as the loop takes them) against the tokens/s the 125m model trains
at here (forward, backward, AdamW on the CPU; ``--trainer-steps``).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

SEQ_LEN, VAL_TOKENS, LANES, BATCH = 1024, 1 << 20, 64, 16


def generate(path: Path, mb: int) -> None:
    if path.is_file() and path.stat().st_size >= mb * 1_000_000:
        return
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    pool = [" ".join(rng.choices(words, k=rng.randint(100, 1500))) for _ in range(2000)]
    tmp = path.with_suffix(".part")
    n = i = 0
    with open(tmp, "w") as f:
        while n < mb * 1_000_000:
            line = json.dumps({"text": f"document {i}. " + pool[i % len(pool)]}) + "\n"
            f.write(line)
            n += len(line)
            i += 1
    tmp.rename(path)


def one(args) -> None:
    """A single measurement, in this process; prints one JSON line."""
    import resource

    import torch
    from transformers import AutoTokenizer

    from bitnet_train.data.block_order import DataPosition
    from bitnet_train.data.stream import PackedData

    tok = AutoTokenizer.from_pretrained(args.tok)
    t0 = time.perf_counter()
    data = PackedData(args.corpus, tok, SEQ_LEN, seed=0, rank=0, world_size=args.world, val_tokens=VAL_TOKENS,
                      lanes=LANES)
    held = data.validation()
    t_val = time.perf_counter() - t0
    pos = DataPosition()
    if args.position == "late":
        lanes = {}
        for lane in range(LANES):
            lo, hi = data._lane_range(lane)
            lanes[str(lane)] = {"epoch": 0, "chunk": 1000, "cursor": {"u": lo + (hi - lo) * 9 // 10, "t": 0}, "taken": 0}
        pos = DataPosition(taken=args.world * 10**6, lanes=lanes)
    it = data.train_blocks(pos)
    x = torch.tensor([next(it) for _ in range(BATCH)], dtype=torch.long)
    t_first = time.perf_counter() - t0
    out = {"mb": args.mb, "world": args.world, "position": args.position, "val_windows": len(held),
           "seconds_to_validation": round(t_val, 2), "seconds_to_first_batch": round(t_first, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "batch": list(x.shape)}
    if args.throughput:
        n, t1 = 0, time.perf_counter()
        while time.perf_counter() - t1 < args.throughput:
            x = torch.tensor([next(it) for _ in range(BATCH)], dtype=torch.long)
            n += x[:, 1:].numel()
        out["tokens_per_s"] = round(n / (time.perf_counter() - t1))
    print(json.dumps(out), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB")
    ap.add_argument("--worlds", default="1,8", help="simulated world sizes (rank 0 measured)")
    ap.add_argument("--dir", default="/tmp/bench-startup", help="where the corpora and the tokenizer go")
    ap.add_argument("--throughput-seconds", type=float, default=20.0)
    ap.add_argument("--trainer-steps", type=int, default=3, help="timed 125m optimizer steps (0: skip)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for k in ("corpus", "tok", "position"):
        ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--throughput", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from bench_harness import machine_line

    print(machine_line(), flush=True)
    if args.one:
        one(args)
        return 0
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    for mb in sizes:
        t = time.perf_counter()
        generate(d / f"corpus-{mb}MB.jsonl", mb)
        print(f"corpus {mb} MB ready ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    tok_dir = d / "tok"
    if not (tok_dir / "tokenizer.json").is_file():
        from bitnet_train.data.documents import iter_documents
        from bitnet_train.data.tokenizer import train_bpe

        train_bpe(iter_documents(str(d / f"corpus-{min(sizes)}MB.jsonl"), max_chars=2_000_000),
                  vocab_size=4096).save_pretrained(tok_dir)

    def run(mb, world, position, throughput=0.0) -> dict:
        cmd = [sys.executable, __file__, "--one", "--corpus", str(d / f"corpus-{mb}MB.jsonl"), "--tok", str(tok_dir),
               "--mb", str(mb), "--world", str(world), "--position", position, "--throughput", str(throughput)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        return json.loads(r.stdout.strip().splitlines()[-1])

    print("| corpus | world size | position | s to validation | s to first batch | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for mb in sizes:
        for world in worlds:
            for position in ("start", "late"):
                m = run(mb, world, position)
                print(f"| {mb} MB | {world} | {position} | {m['seconds_to_validation']} | "
                      f"{m['seconds_to_first_batch']} | {m['peak_rss_mb']} |", flush=True)
    mid = sizes[len(sizes) // 2]
    rates = {w: run(mid, w, "start", args.throughput_seconds)["tokens_per_s"] for w in worlds}
    trainer = None
    if args.trainer_steps:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_data import time_trainer

        trainer = time_trainer("125m", 4096, 256, 2, args.trainer_steps, 1)
    for w, r in rates.items():
        ratio = f", {r / trainer:,.0f}x the 125m trainer here ({trainer:,.0f} tokens/s)" if trainer else ""
        print(f"data path, rank 0 of {w} ({mid} MB corpus): {r:,} tokens/s{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
