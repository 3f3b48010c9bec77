"""The models: BitLinear and its backends, the BitNet model family (presets, building, loading), and
the conversion of a Hugging Face model to a ternary one."""
