#!/usr/bin/env python3
"""Train a small ReLU LLaMA on real text, with learned (not built-in) activation sparsity.

Synthetic models fire the way the generator says, which is easy to predict; real firing is what
users bring. This trains a 6-layer, 256-wide LLaMA with a ReGLU FFN on real English prose and an
L1 penalty on the FFN activations (as ProSparse does), whose weight adapts until 5-10% of neurons
fire, and writes an HF checkpoint that pi-convert reads.

Two steps, because the GPU machine has torch but no llama.cpp, and this machine the reverse:

    # here: tokenize the training text with llama.cpp's tokenizer (the sdist's LLaMA vocabulary)
    python tools/train_relu_llama.py prepare .gpu/train
    # on the GPU machine (device tool, carrying .gpu): train, write the checkpoint
    python3 tools/train_relu_llama.py train .gpu/train $OUT/ckpt --steps 1500

Training text: Python's own documentation prose (pydoc_data.topics), the package's default
calibration corpus. Held out for evaluation: /usr/share/common-licenses (never trained on or used
for calibration; see tools/eval_predictors.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def prepare(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import llama_cpp

    from powerinfer_gguf.build import vocab_path
    from powerinfer_gguf.hf import write_sentencepiece_model
    from powerinfer_gguf.profile import default_corpus

    out.mkdir(parents=True, exist_ok=True)
    vocab = vocab_path("llama-spm")
    llm = llama_cpp.Llama(str(vocab), vocab_only=True, verbose=False)
    ids = llm.tokenize(default_corpus().encode(), add_bos=False, special=False)
    np.save(out / "tokens.npy", np.array(ids, dtype=np.int32))
    write_sentencepiece_model(vocab, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}, indent=2))
    print(f"{len(ids)} training tokens -> {out}")


def train(data: Path, out: Path, steps: int, d: int, n_layer: int, n_head: int, n_ff: int,
          seq: int, batch: int, target: float, seed: int) -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    toks = torch.from_numpy(np.load(data / "tokens.npy").astype(np.int64))
    V, bos = 32000, 1
    hd = d // n_head

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    ang = torch.outer(torch.arange(seq, device=dev).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # HF convention: rotate halves
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()
            self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.gate_proj, self.up_proj = nn.Linear(d, n_ff, bias=False), nn.Linear(d, n_ff, bias=False)
            self.down_proj = nn.Linear(n_ff, d, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            h = self.input_layernorm(x)
            q = rope(self.q_proj(h).view(B, T, n_head, hd).transpose(1, 2))
            k = rope(self.k_proj(h).view(B, T, n_head, hd).transpose(1, 2))
            v = self.v_proj(h).view(B, T, n_head, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, d))
            h = self.post_attention_layernorm(x)
            act = F.relu(self.gate_proj(h)) * self.up_proj(h)
            return x + self.down_proj(act), act

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(V, d)
            self.layers = nn.ModuleList(Layer() for _ in range(n_layer))
            self.norm = RMSNorm()
            self.lm_head = nn.Linear(d, V, bias=False)

        def forward(self, ids):
            x = self.embed_tokens(ids)
            acts = []
            for layer in self.layers:
                x, a = layer(x)
                acts.append(a)
            return self.lm_head(self.norm(x)), acts

    model = Model().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    lam = 0.0
    n = len(toks) - seq
    t0 = time.time()
    for step in range(steps):
        lr = 1e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n, (batch,))
        ids = torch.stack([torch.cat([torch.tensor([bos]), toks[s:s + seq - 1]]) for s in starts]).to(dev)
        tgt = torch.stack([toks[s:s + seq] for s in starts]).to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits, acts = model(ids)
            ce = F.cross_entropy(logits.float().view(-1, V), tgt.view(-1))
            l1 = sum(a.float().abs().mean() for a in acts) / n_layer
            loss = ce + lam * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            firing = float(sum((a != 0).float().mean() for a in acts) / n_layer)
        if step >= 200 and step % 20 == 0:  # adapt the L1 weight towards the firing target
            lam = max(lam, 1e-4) * (1.25 if firing > target else 0.8)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  ce {ce.item():.3f}  firing {firing:.3f}  l1-weight {lam:.4g}  "
                  f"{time.time() - t0:.0f} s", flush=True)
    save_hf(model, data, out, d, n_layer, n_head, n_ff, V)


def save_hf(model, data: Path, out: Path, d, n_layer, n_head, n_ff, V, shard_bytes: int = 15 << 20) -> None:
    """F16 safetensors in shards of at most 15 MiB (the device tool returns files up to 16 MiB)."""
    import shutil

    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    import re

    def hf_name(k: str) -> str:  # our module names -> HF LlamaForCausalLM's
        k = re.sub(r"^layers\.(\d+)\.(q_proj|k_proj|v_proj|o_proj)", r"layers.\1.self_attn.\2", k)
        k = re.sub(r"^layers\.(\d+)\.(gate_proj|up_proj|down_proj)", r"layers.\1.mlp.\2", k)
        return k if k.startswith("lm_head") else "model." + k

    sd = {hf_name(k): v.detach().float().cpu().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        if cur and size + sd[k].nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = sd[k]
        size += sd[k].nbytes
    shards.append(cur)
    wmap = {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(out / name), metadata={"format": "pt"})
        wmap.update({k: name for k in sh})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}, indent=1))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "relu",
        "hidden_size": d, "intermediate_size": n_ff, "num_hidden_layers": n_layer,
        "num_attention_heads": n_head, "num_key_value_heads": n_head, "vocab_size": V,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}, indent=2))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(data / f, out / f)
    print(f"wrote {out} ({len(shards)} shards)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    t = sub.add_parser("train")
    t.add_argument("data", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--d", type=int, default=256)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--ff", type=int, default=704)
    t.add_argument("--seq", type=int, default=128)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--target", type=float, default=0.08, help="firing rate the L1 weight steers to")
    t.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.out)
    else:
        train(a.data, a.out, a.steps, a.d, a.layers, a.heads, a.ff, a.seq, a.batch, a.target, a.seed)


if __name__ == "__main__":
    main()
