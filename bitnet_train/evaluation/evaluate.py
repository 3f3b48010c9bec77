"""``bitnet-train eval MODEL``: perplexity and bits per UTF-8 byte of a corpus, or lm-evaluation-harness tasks.

MODEL: a checkpoint directory (our BitLinear forward), a packed ``export --format hf`` directory (stock
transformers) or a ``.gguf`` in the runtime that computes it (:func:`bitnet_train.runtimes.engine_for`). DATA:
anything ``data.path`` accepts (:mod:`bitnet_train.data.documents`), each piece tokenized alone as in training.
Every token is predicted once, NLL summed in float64. Packed (default): the training stream ``EOS doc1 EOS
doc2 EOS ...`` in windows of ``seq_len`` predictions, each from a fresh context (EOS tokens are predicted
too, as in training's loss). ``--per-document``: each document alone, its first token conditioned on EOS,
then disjoint windows of the model's context: lm-eval's ``loglikelihood_rolling`` with ``prefix_token_id``
= EOS (:func:`rolling_windows`). bits per byte = NLL / ln 2 / UTF-8 bytes scored; perplexity = exp(mean NLL).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from bitnet_train.errors import DataError, UserError
from bitnet_train.runtimes.base import Runtime
from bitnet_train.data.windows import Packer


def rolling_windows(tokens: list[int], prefix: int, max_len: int):
    """(seq, n_pred) windows of one document, as lm-eval's ``get_rolling_token_windows(context_len=1)``
    then ``make_disjoint_window``: the model reads ``seq[:-1]`` (at most ``max_len`` tokens) and its
    last ``n_pred`` next-token predictions score ``seq[-n_pred:]``; every token is scored once."""
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix] + tokens[:first], first
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        yield tokens[max(end - max_len - 1, 0) : end], n
        done = end


def _documents(rt: Runtime, spec: str, text_field: str, split: str):
    """(pieces, token lists) of each document; a .txt file's line chunks are one document."""
    from bitnet_train.data.documents import iter_piece_batches

    doc, ids = [], []  # the texts and token lists of the document being read
    for batch in iter_piece_batches(spec, text_field, split, batch=16):
        for (text, end), toks in zip(batch, rt.encode([t for t, _ in batch])):
            doc.append(text)
            ids.append(list(toks))
            if end:
                yield doc, ids
                doc, ids = [], []
    if doc:
        yield doc, ids


def score(rt: Runtime, spec: str, seq_len: int, per_document: bool = False, max_tokens: int | None = None,
          text_field: str = "text", split: str = "train", progress: bool = True, batch: int = 8) -> dict:
    """Total NLL, tokens and bytes of the corpus ``spec`` under ``rt`` (see the module docstring)."""
    from tqdm.auto import tqdm

    budget = max_tokens if max_tokens and max_tokens > 0 else None
    tokens, nbytes, docs, total = 0, 0, 0, 0.0
    pending: list[tuple[list[int], int]] = []
    bar = tqdm(total=budget, unit="tok", desc=f"eval [{rt.name}]", disable=not progress, dynamic_ncols=True)

    def flush(least: int = 1):
        nonlocal total
        while len(pending) >= least and pending:
            part = pending[:batch]
            total += math.fsum(rt.nll(part))
            bar.update(sum(k for _, k in part))
            del pending[:batch]

    packer = Packer(rt.eos, seq_len)  # packed: EOS before the first prediction, as after a document's end

    def scored() -> int:  # predictions made or queued so far
        return tokens + (0 if per_document else packer.queued)

    t0 = time.perf_counter()
    for pieces, ids in _documents(rt, spec, text_field, split):
        doc_toks: list[int] = []
        for text, full in zip(pieces, ids):
            left = None if budget is None else budget - scored() - len(doc_toks)
            if left is not None and left < len(full):  # the budget ends inside this piece
                nbytes += rt.prefix_bytes(text, full, left) if left > 0 else 0
                doc_toks += full[: max(left, 0)]
                break
            nbytes += len(text.encode("utf-8"))
            doc_toks += full
        docs += 1
        if per_document:
            pending.extend(rolling_windows(doc_toks, rt.eos, seq_len))
            tokens += len(doc_toks)
        else:
            packer.push(doc_toks)
            if budget is None or scored() < budget:
                packer.push([rt.eos])
            for w in packer.windows():  # full windows: seq_len predictions each
                pending.append((w, seq_len))
                tokens += seq_len
        flush(least=batch)
        if budget is not None and scored() >= budget:
            break
    if not per_document:
        for w in packer.rest():
            pending.append((w, len(w) - 1))
            tokens += len(w) - 1
    flush()
    bar.close()
    secs = time.perf_counter() - t0
    if tokens == 0 or nbytes == 0:
        raise UserError(f"data {spec!r}: no text to score (the documents are empty)")
    return {"loss": total / tokens, "perplexity": math.exp(total / tokens), "bits_per_byte": total / math.log(2) / nbytes,
            "tokens": tokens, "bytes": nbytes, "documents": docs, "nll": total, "seconds": secs,
            "tokens_per_s": tokens / max(secs, 1e-9), "runtime": rt.name, "seq_len": seq_len,
            "mode": "per-document" if per_document else "packed"}


def evaluate(model: str, data: str, seq_len: int | None = None, per_document: bool = False,
             max_tokens: int | None = None, text_field: str = "text", split: str = "train", device: str | None = None,
             batch_size: int = 8, threads: int | None = None, progress: bool = True) -> dict:
    """Score ``data`` under ``model``; returns the figures ``--json`` prints."""
    from bitnet_train.data.documents import resolve_files

    rt = None
    try:
        resolve_files(data)  # a bad path fails before the model loads
        rt = _open(model, seq_len, device or _default_device(), batch_size, threads)
        context = rt.n_ctx_train or rt.n_ctx  # the model's own context bounds --seq-len
        n = seq_len or (rt.train_seq_len if not per_document else None) or context
        if n < 1 or n > context:
            raise UserError(f"--seq-len {n}: must be between 1 and the model's context ({context})")
        out = score(rt, data, n, per_document, max_tokens, text_field, split, progress, batch_size)
    except DataError as e:
        raise UserError(str(e).replace("data.path ", "--data ", 1)) from None
    finally:
        if rt is not None:
            rt.close()
    out["model"], out["data"] = str(model), data
    return out


def _open(model: str, n_ctx: int | None, device: str, batch_size: int, threads: int | None) -> Runtime:
    """``model`` in the engine that computes it, with every position's logits and an EOS to separate
    documents with."""
    from bitnet_train.runtimes import engine_for, open_model

    engine = engine_for(model)
    if engine == "bitnet.cpp":
        raise UserError(f"{model}: an I2_S GGUF runs only in bitnet.cpp, which eval does not drive; evaluate the "
                        "checkpoint, or an export in another format")
    rt = open_model(model, engine=engine, n_ctx=n_ctx, threads=threads, all_logits=True, device=device,
                    batch_size=batch_size)
    if rt.eos is None:
        rt.close()
        raise UserError(f"{model}: the model has no EOS token (tokenizer eos_token_id / tokenizer.ggml.eos_token_id) "
                        "to separate documents with")
    return rt


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"



def run_tasks(model: str, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
              output: str | None = None, device: str | None = None, batch_size: int = 8) -> tuple[dict, Path]:
    """lm-evaluation-harness (``simple_evaluate``, model ``hf``: stock transformers) on a checkpoint or
    packed export; a task is a registered name or a task YAML file. Writes the results JSON atomically
    to ``output`` (default ``MODEL.lm-eval.json`` beside MODEL); returns (results, that path)."""
    from bitnet_train.checkpoint.format import read_config_json

    p = Path(model)
    if not p.is_dir():
        raise UserError(f"{model}: --tasks needs a checkpoint or export --format hf directory"
                        + ("" if p.exists() else " (no such directory)"))
    read_config_json(p)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install 'bitnet-train[eval]'") from None
    import torch

    from bitnet_train.fsutil import atomic_path
    from bitnet_train.data.tokenizer import load_tokenizer

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=sorted({str(Path(t).resolve().parent) for t in tasks if Path(t).is_file()}) or None)
    for t in tasks:
        if not Path(t).is_file() and t not in set(tm.all_tasks) and not tm.match_tasks([t]):
            hint = " (no such task file)" if t.endswith((".yaml", ".yml")) else ""
            raise UserError(f"--tasks: lm-evaluation-harness knows no task {t!r}{hint}")
    eos = load_tokenizer(str(p)).eos_token_id
    # loglikelihood_rolling's empty context: the end-of-text token, as in our pretraining stream
    args = f"pretrained={p.resolve()},dtype=float32" + (f",prefix_token_id={eos}" if eos is not None else "")
    with torch._dynamo.config.patch(disable=True):  # transformers' BitNet kernels, eager
        try:
            res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), num_fewshot=num_fewshot,
                                          limit=limit, device=device or _default_device(), batch_size=batch_size,
                                          task_manager=tm, log_samples=False)
        except (KeyError, FileNotFoundError) as e:
            raise UserError(f"--tasks {','.join(tasks)}: {e}") from None
    out = Path(output) if output else p.parent / f"{p.name}.lm-eval.json"
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(res, indent=2, default=str, sort_keys=True))
    return res, out



def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per byte of a model on a corpus, or lm-evaluation-harness tasks",
                       description=__doc__.split("\n\n")[1])
    a = p.add_argument
    a("model", metavar="MODEL", help="checkpoint directory, export --format hf directory or .gguf file")
    a("--data", metavar="PATH", help="file, directory, glob, hf:<dataset>[:<config>] or builtin:pydoc")
    a("--text-field", default="text", help="text field/column of jsonl, parquet, arrow and hf: data")
    a("--split", default="train", help="split of an hf: dataset (default: train)")
    a("--seq-len", type=int, metavar="N", help="window length in tokens (default: packed, the training seq_len saved "
      "with the checkpoint, else the model's context; --per-document, the model's context)")
    a("--max-tokens", type=int, metavar="N", help="score the first N tokens only")
    a("--per-document", action="store_true",
      help="score each document alone from its start (lm-eval's loglikelihood_rolling, EOS prefix)")
    a("--json", action="store_true", help="print one JSON object instead of the table")
    a("--batch-size", type=int, default=8, metavar="N", help="windows per forward (torch models; lm-eval)")
    a("--device", help="torch device (default: cuda when available, else cpu)")
    a("--threads", type=int, help="CPU threads of a GGUF runtime (default: up to 8)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--tasks", metavar="T1,T2", help="lm-evaluation-harness task names or task YAML files")
    a("--num-fewshot", type=int, metavar="K", help="few-shot examples per task (lm-eval)")
    a("--limit", type=float, metavar="N", help="examples per task (lm-eval; below 1: a fraction)")
    a("--output", metavar="FILE", help="lm-eval results JSON (default: MODEL.lm-eval.json beside MODEL)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    for flag in ("seq_len", "max_tokens", "batch_size", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.tasks:
        if args.data:
            raise UserError("give --data (perplexity) or --tasks (lm-evaluation-harness), not both")
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        res, out = run_tasks(args.model, tasks, args.num_fewshot, limit, args.output, args.device, args.batch_size)
        from lm_eval.utils import make_table

        print(f"{make_table(res)}results: {out}")
        return 0
    if not args.data:
        raise UserError("give --data PATH (a corpus to score) or --tasks T1,T2")
    r = evaluate(args.model, args.data, args.seq_len, args.per_document, args.max_tokens, args.text_field,
                 args.split, args.device, args.batch_size, args.threads, progress=not args.no_progress)
    if args.json:
        keys = ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "tokens_per_s", "model", "runtime",
                "documents", "mode", "seq_len", "data")
        print(json.dumps({k: r[k] for k in keys}))
        return 0
    print(f"eval {r['model']} [{r['runtime']}] on {r['data']} ({r['mode']}, windows of {r['seq_len']} tokens)\n"
          f"  documents {r['documents']:,}, tokens {r['tokens']:,}, bytes {r['bytes']:,}\n"
          f"  loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}, bits per byte {r['bits_per_byte']:.4f}, "
          f"{r['tokens_per_s']:,.0f} tokens/s")
    return 0
