"""The data pipeline: corpora read as documents, tokenized, packed into training blocks (a stream or
pre-tokenized shards), in an order every rank agrees on."""
