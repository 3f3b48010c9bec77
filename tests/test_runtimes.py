"""The runtimes and formats tables: which engine computes a file, that every format names a real engine and
graph, and that engines are driven from one package only."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from bitnet_train.errors import ExportError, UserError
from bitnet_train.export import formats
from bitnet_train.runtimes import ENGINES, engine_for, gguf_engine
from bitnet_train.runtimes.bitnetcpp import FILE_TYPE_I2_S, GGML_TYPE_I2_S
from bitnet_train.runtimes.ikllama import GGML_TYPES

REPO = Path(__file__).resolve().parents[1]


def head(arch, types=(0, 1), file_type=None):
    return {"arch": arch, "types": set(types), "file_type": file_type, "tensors": [], "meta": {}}


def test_gguf_engine_follows_the_header():
    assert gguf_engine(head("bitnet")) == "llama.cpp"
    assert gguf_engine(head("llama")) == "llama.cpp"
    assert gguf_engine(head("bitnet-25")) == "ik_llama.cpp"
    assert gguf_engine(head("bitnet-b1.58")) == "ik_llama.cpp"
    for t, _name in GGML_TYPES.values():  # ik's ternary types, whatever the architecture says
        assert gguf_engine(head("bitnet", (0, t))) == "ik_llama.cpp"
    # I2_S is bitnet.cpp's, also under the bitnet-b1.58 name Microsoft's files carry
    assert gguf_engine(head("bitnet", (0, GGML_TYPE_I2_S))) == "bitnet.cpp"
    assert gguf_engine(head("bitnet-b1.58", (0, GGML_TYPE_I2_S))) == "bitnet.cpp"
    assert gguf_engine(head("bitnet", (0,), FILE_TYPE_I2_S)) == "bitnet.cpp"


def test_engine_for_a_real_file_and_directories(tmp_path):
    import gguf

    f = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(f), "bitnet-25")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert engine_for(f) == "ik_llama.cpp"
    for mode, engine in (("offline", "transformers"), ("online", "bitnet-train")):
        d = tmp_path / mode
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "bitnet", "quantization_config": {
            "quant_method": "bitnet", "quantization_mode": mode}}))
        assert engine_for(d) == engine
    with pytest.raises(UserError, match="no such file"):
        engine_for(tmp_path / "missing.gguf")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match="not a GGUF file"):
        engine_for(bad)


def test_every_format_names_an_engine_and_a_graph():
    for f in formats.FORMATS:
        assert f.runtime in ENGINES, f
        for name in f.graphs:
            g = formats.GRAPHS[name]
            assert g.runtime in ENGINES
            # the format's runtime computes the graph (bitnet.cpp runs llama.cpp's bitnet graph)
            assert f.runtime == g.runtime or (f.runtime, g.arch) == ("bitnet.cpp", "bitnet"), f
        assert 0 < f.tolerance.max_rel <= 5e-2 and 0.8 <= f.tolerance.min_top1 <= 1.0
        assert (f.emulate is not None) == (f.tolerance.max_emulated is not None), f
    keys = [f.key for f in formats.FORMATS]
    assert len(keys) == len(set(keys))  # a report names one format


def test_find_names_what_is_ambiguous_or_wrong():
    assert formats.find("tq2_0").runtime == "llama.cpp"
    assert formats.find("f16", "ik_llama.cpp").key == "ik_f16"
    with pytest.raises(ExportError, match="--quant f16 runs in llama.cpp or ik_llama.cpp"):
        formats.find("f16")
    with pytest.raises(ExportError, match="--quant tq2_0 is llama.cpp's format"):
        formats.find("tq2_0", "ik_llama.cpp")
    with pytest.raises(ExportError, match="GGUF formats are"):
        formats.find("q4_0")


def test_engines_are_driven_only_from_the_runtimes_package():
    """No module outside bitnet_train/runtimes imports an engine's library: a runtime has one home."""
    engine_libs = {"llama_cpp", "ik_llama_cpp"}
    found = []
    for f in sorted((REPO / "bitnet_train").rglob("*.py")):
        if "runtimes" in f.relative_to(REPO / "bitnet_train").parts:
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{f.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in engine_libs]
    assert not found, found
