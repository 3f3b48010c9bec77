"""Checkpoints: the model format on disk that stock transformers loads, and a run's checkpoints
(which one a run continues from, the training state saved with the model)."""
