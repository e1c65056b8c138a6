"""Tokenizers read from HF files become vocabularies on which llama.cpp tokenizes as the sdist's
reference outputs say (models/ggml-vocab-*.gguf.inp / .out)."""
from __future__ import annotations

import json

import pytest


def _ref_cases(vocab_gguf):
    inp = vocab_gguf.with_name(vocab_gguf.name + ".inp").read_text().split("\n__ggml_vocab_test__\n")
    out = vocab_gguf.with_name(vocab_gguf.name + ".out").read_text().split("\n")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(inp, out) if t]


def _tokenize_with(vocab, tmp_path, texts):
    import gguf
    import llama_cpp

    w = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    for k, v in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 64),
                 ("attention.head_count", 1), ("context_length", 64)):
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    vocab.write(w)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file(); w.close()
    llm = llama_cpp.Llama(str(tmp_path / "v.gguf"), vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]


def test_byte_level_bpe_tokenizer_json(tmp_path):
    """LLaMA-3's tokenizer as an HF tokenizer.json (made from the sdist's vocab file)."""
    import gguf

    from powerinfer_gguf.build import vocab_path
    from powerinfer_gguf.hf import _LLAMA3_SPLIT, read_tokenizer

    src = vocab_path("llama-bpe")
    f = gguf.GGUFReader(src).fields
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    regex = _LLAMA3_SPLIT + "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    tj = {"model": {"type": "BPE", "vocab": {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1},
                    "merges": f["tokenizer.ggml.merges"].contents()},
          "added_tokens": [{"id": i, "content": t, "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 1],
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
              {"type": "ByteLevel", "add_prefix_space": False}]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    v = read_tokenizer(tmp_path)
    assert v.model == "gpt2" and v.pre == "llama-bpe" and v.tokens == tokens
    assert v.bos_id == f["tokenizer.ggml.bos_token_id"].contents() and v.add_bos
    cases = _ref_cases(src)
    got = _tokenize_with(v, tmp_path, [t for t, _ in cases])
    assert got == [ids for _, ids in cases]


def test_sentencepiece_tokenizer_model(tmp_path):
    from powerinfer_gguf.build import vocab_path
    from powerinfer_gguf.hf import read_tokenizer, write_sentencepiece_model

    src = vocab_path("llama-spm")
    write_sentencepiece_model(src, tmp_path / "tokenizer.model")
    v = read_tokenizer(tmp_path)
    assert v.model == "llama" and (v.bos_id, v.eos_id, v.unk_id) == (1, 2, 0)
    cases = _ref_cases(src)
    got = _tokenize_with(v, tmp_path, [t for t, _ in cases])
    assert got == [ids for _, ids in cases]


def test_unsupported_tokenizer_json(tmp_path):
    from powerinfer_gguf.hf import CheckpointError, read_tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(CheckpointError, match="WordPiece"):
        read_tokenizer(tmp_path)
