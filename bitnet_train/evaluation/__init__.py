"""``bitnet-train eval``: bits per byte and perplexity of a checkpoint or an export on the same documents,
and lm-evaluation-harness tasks (``evaluate``). The scoring arithmetic it shares with export's
verification: :mod:`bitnet_train.runtimes.nll`; the packed windows it shares with validation:
:mod:`bitnet_train.data.windows`."""
