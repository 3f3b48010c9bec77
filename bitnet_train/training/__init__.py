"""Pretraining: the recipe and its command, the run object, the loop, the objective (plain or
distilled), the optimizer and its schedules, the quantization warm-up, metrics, and the distributed path."""
