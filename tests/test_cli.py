"""The bitnet-train command line: init, info, errors, the console script."""

import json
import shutil
import subprocess

import pytest

from bitnet_train.cli import main


def test_init_then_info(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["init", "tiny", "--out", str(out), "--seed", "3"]) == 0
    assert (out / "config.json").is_file()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["ternary_parameters"] > 0 and info["bitlinear_layers"] == 28
    assert info["parameters"] == info["ternary_parameters"] + info["full_precision_parameters"]
    assert info["bytes_packed"] < info["bytes_bf16"] / 2


def test_info_2b4t_table(capsys):
    assert main(["info", "2b4t"]) == 0
    text = capsys.readouterr().out
    assert "2,412,820,480" in text and "30 layers, hidden 2560, 20 heads / 5 KV heads, FFN 6912" in text
    assert main(["info", "--list"]) == 0
    assert "tiny-silu" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["init", "tinyy", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'tinyy'" in err and "tiny-silu" in err
    assert not (tmp_path / "x").exists()
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_console_script(tmp_path):
    exe = shutil.which("bitnet-train")
    if exe is None:
        pytest.skip("console script not installed")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "init" in r.stdout and "info" in r.stdout
