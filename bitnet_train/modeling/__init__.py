"""The models: the BitNet model family (presets, building, loading: ``models``) and the conversion of a
Hugging Face model to a ternary one (``convert``). The layer itself: :mod:`bitnet_train.layers`."""
