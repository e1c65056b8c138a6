"""pi-info: what a GGUF holds, as text and JSON; bad input is one line."""
from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli


def test_info_of_our_file_and_its_twin(tiny_pi):
    _, ours, twin = tiny_pi
    r = run_cli("info", ours, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["n_layer"], d["n_embd"], d["n_ff"], d["n_head"], d["n_head_kv"]) == (4, 256, 704, 4, 2)
    assert d["activation"] == "relu" and d["powerinfer"]["powerinfer.sparse"] is True
    assert 0 < d["ffn_bytes"] < d["weight_bytes"] <= d["file_bytes"]
    text = run_cli("info", twin)
    assert text.returncode == 0 and "4 layers, n_embd 256, n_ff 704" in text.stdout
    assert "powerinfer.stock_twin = stock llama.cpp twin of" in text.stdout  # the twin says what it is


@pytest.mark.parametrize("what,msg", [
    ("missing", "no such model file"),
    ("folder", "not a file"),
    ("text", "not a GGUF file"),
    ("junk", "not a readable GGUF"),
])
def test_info_bad_input_is_one_line(tmp_path, what, msg):
    path = {"missing": tmp_path / "nope.gguf", "folder": tmp_path, "text": tmp_path / "notes.txt",
            "junk": tmp_path / "junk.gguf"}[what]
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    assert_one_line_error(run_cli("info", path), msg)
