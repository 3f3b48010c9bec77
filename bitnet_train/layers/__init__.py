"""The ternary layer: :class:`~bitnet_train.layers.bitlinear.BitLinear` and the converter that swaps a model's
``nn.Linear`` layers for it, its ``torch`` backend and parts (``bitlinear_torch``), and which backend runs
(``backends``)."""
