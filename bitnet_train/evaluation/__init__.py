"""Scoring a model: negative log-likelihood, the packed scoring windows, and ``bitnet-train eval``."""
