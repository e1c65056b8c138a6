#!/usr/bin/env python3
"""Our file in PowerInfer's own format, for running PowerInfer itself on the same weights (issue 19).

PowerInfer (SJTU-IPADS/PowerInfer, main; read for its formats, nothing of it copied) reads a GGUF
whose magic is PWRI, with per layer ``blk.N.fc1.weight`` [rank, n_embd], ``blk.N.fc2.weight``
[n_ff, rank] and ``blk.N.ffn_down_t.weight`` (ours has the same), and one model-wide
``powerinfer.sparse_threshold``: neuron j is computed where fc2_j relu(fc1 x) >= threshold, x being
the residual stream *before* ffn_norm (llama.cpp of PowerInfer, llm_build_llama: ``ffn_inp``).
GPU neurons come from ``<model>.generated.gpuidx`` (arch generic.gpu_index: per layer gpu_idx, I32
0/1 per neuron, and gpu_bucket, the sorted indices of the GPU neurons; split.vram_capacity), also
PWRI-stamped; ``gpuidx`` writes it for a neuron capacity as PowerInfer's solver means to (the
hottest neurons over all layers, in batches of 256).

Ours decides on the normed input xn = x / rms(x) * w with its own threshold per neuron t_j:
fc2_j act(fc1 xn) > t_j. The mapping, per layer:
- the norm's weight folds into fc1 (fc1 diag(w)); act "none" (linear) becomes PowerInfer's ReLU
  form with doubled rank, fc1' = [fc1; -fc1], fc2' = [fc2, -fc2]: fc2' relu(fc1' x) = fc2 fc1 x;
- every t_j of the file must be negative (ours' synthetic and fitted thresholds are): row j of fc2
  is scaled by 1 / (|t_j| c), threshold -1, where c is the layer's median rms(x) on calibration text.
  Exact where rms(x) = c; rms(x) of a wide residual stream varies by a few percent between tokens,
  so decisions near the margin can differ: the tool prints the agreement per layer.
Usage:
  tools/powerinfer_peer.py model OURS.pi.gguf OUT.powerinfer.gguf [--tokens 256]
  tools/powerinfer_peer.py gpuidx OURS.pi.gguf OUT.powerinfer.gguf.generated.gpuidx --neurons N [--vram-capacity B]
"""
from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerinfer_gguf import format as fmt  # noqa: E402

PEER_THRESHOLD = -1.0
MAGIC = b"PWRI"


def peer_predictor(fc1: np.ndarray, fc2: np.ndarray, threshold: np.ndarray, act: str, norm_w: np.ndarray,
                   rms: float) -> tuple[np.ndarray, np.ndarray]:
    """(fc1', fc2') deciding fc2' relu(fc1' x) >= PEER_THRESHOLD on the residual x as ours decides on
    xn (exactly where rms(x) = rms)."""
    if not (threshold < 0).all():
        raise ValueError("PowerInfer's predictor has no bias: this mapping needs every threshold negative "
                         f"(min {threshold.min():.3g}, max {threshold.max():.3g})")
    f1 = fc1 * norm_w[None, :]
    if act == "none":
        f1, fc2 = np.concatenate([f1, -f1]), np.concatenate([fc2, -fc2], axis=1)
    elif act != "relu":
        raise ValueError(f"predictor act {act!r}: known are none and relu")
    return f1.astype(np.float32), (fc2 / (np.abs(threshold)[:, None] * rms)).astype(np.float32)


def peer_predict(fc1: np.ndarray, fc2: np.ndarray, x: np.ndarray) -> np.ndarray:
    """PowerInfer's decision on residual rows x [T, n_embd]: computed where the score >= threshold."""
    return np.maximum(x @ fc1.T, 0) @ fc2.T >= PEER_THRESHOLD


def _norm_weights(path: str) -> tuple[list[np.ndarray], float]:
    import gguf

    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    n_layer = int(r.fields["llama.block_count"].contents())
    eps = float(r.fields["llama.attention.layer_norm_rms_epsilon"].contents())
    return [np.asarray(t[f"blk.{i}.ffn_norm.weight"].data, np.float32) for i in range(n_layer)], eps


def calibrate(path: str, n_tokens: int) -> tuple[list, list]:
    """Per layer: (fc1', fc2') mapped at the median residual rms, and (layer, agreement with ours,
    ours' recall, the peer's recall, ours' and the peer's share selected, rms spread) on the
    calibration tokens, the true firing from a numpy forward."""
    from powerinfer_gguf.predictor import profile_file, quality
    from powerinfer_gguf.profile import default_corpus

    norms, eps = _norm_weights(path)
    maps, report = [], []

    def visit(obs, p) -> None:
        rms = np.sqrt(np.mean(obs.resid.astype(np.float64) ** 2, axis=1) + eps)
        f1, f2 = peer_predictor(p.fc1, p.fc2, p.threshold, p.act, norms[obs.layer], float(np.median(rms)))
        ours, peer = p.predict(obs.ffn_in), peer_predict(f1, f2, obs.resid)
        maps.append((f1, f2))
        report.append((obs.layer, float((ours == peer).mean()), quality(ours, obs.active).recall,
                       quality(peer, obs.active).recall, float(ours.mean()), float(peer.mean()),
                       float(rms.std() / rms.mean())))

    profile_file(path, default_corpus(), visit, n_tokens, 64, progress=False)
    return maps, report


def _stamp(path: Path) -> None:
    """PowerInfer's magic over GGUF's (its readers check it; stock readers refuse the file)."""
    with open(path, "r+b") as f:
        f.write(MAGIC)


def write_model(ours: str, out: Path, maps: list) -> None:
    """Our file's keys and tensors (bytes as they are) with the predictors in PowerInfer's form (F16,
    as ours store theirs) and its threshold key; our own predictor tensors and keys left out."""
    import gguf

    r = gguf.GGUFReader(ours)
    w = gguf.GGUFWriter(out, "llama")
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name.startswith(fmt.NAMESPACE + ".") or name == "general.architecture":
            continue
        value, vtype, sub = fmt.field_item(field)
        w.add_key_value(name, value, vtype, sub)
    w.add_float32("powerinfer.sparse_threshold", PEER_THRESHOLD)
    T = fmt.Tensors
    for t in r.tensors:
        il = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
        if t.name in (T.PRED_THRESHOLD.format(il), T.NEURON_FREQ.format(il)):
            continue
        if t.name in (T.PRED_FC1.format(il), T.PRED_FC2.format(il)):
            which = 0 if t.name == T.PRED_FC1.format(il) else 1
            w.add_tensor(f"blk.{il}.fc{which + 1}.weight", maps[il][which].astype(np.float16))
            continue
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _stamp(out)


def write_gpuidx(ours: str, out: Path, neurons: int, vram_capacity: int, batch: int = 256) -> list[int]:
    """The GPU neurons PowerInfer's solver means to choose for a capacity of ``neurons``: the
    hottest over all layers (its objective, the activation counts it is given: ours' frequencies),
    in whole batches of ``batch`` (its unit). Our files are ranked hot to cold, so a layer's GPU
    neurons are its first ones. Returns the count per layer."""
    import gguf

    r = gguf.GGUFReader(ours)
    freqs = [np.asarray(t.data, np.float64) for t in r.tensors if t.name.endswith("pi_neuron_freq")]
    # batch masses of every layer, hottest first; a layer's batches are taken in its own order
    masses = [(f[i:i + batch].sum(), il, i) for il, f in enumerate(freqs) for i in range(0, len(f) - batch + 1, batch)]
    counts = [0] * len(freqs)
    for _, il, _ in sorted(masses, reverse=True)[:max(0, neurons // batch)]:
        counts[il] += batch
    w = gguf.GGUFWriter(out, "generic.gpu_index")
    for il, (f, k) in enumerate(zip(freqs, counts)):
        idx = np.zeros(len(f), np.int32)
        idx[:k] = 1
        w.add_tensor(f"blk.{il}.gpu_idx", idx)
        w.add_tensor(f"blk.{il}.gpu_bucket", np.arange(k, dtype=np.int32))
    w.add_block_count(len(freqs))
    w.add_uint64("split.vram_capacity", vram_capacity)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _stamp(out)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("ours")
    m.add_argument("out")
    m.add_argument("--tokens", type=int, default=256, help="calibration tokens (the rms per layer)")
    g = sub.add_parser("gpuidx")
    g.add_argument("ours")
    g.add_argument("out")
    g.add_argument("--neurons", type=int, required=True, help="GPU neuron capacity (PowerInfer's --capacity)")
    g.add_argument("--vram-capacity", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    problem = (f"{a.ours}: no such file" if not Path(a.ours).is_file() else
               f"{out} exists (remove it first)" if out.exists() else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    from powerinfer_gguf.outputs import staged

    with staged() as st:  # whole or not at all
        tmp = st.file(out)
        if a.cmd == "gpuidx":
            counts = write_gpuidx(a.ours, tmp, a.neurons, a.vram_capacity)
            st.commit()
            print(f"wrote {out}: GPU neurons per layer {counts}")
            return 0
        maps, report = calibrate(a.ours, a.tokens)
        print("layer  agree   recall ours  peer   selected ours  peer   rms sd/mean")
        for il, agree, r_o, r_p, s_o, s_p, spread in report:
            print(f"{il:5d}  {agree:.4f}  {r_o:11.4f}  {r_p:.4f}  {s_o:13.4f}  {s_p:.4f}  {spread:.4f}")
        write_model(a.ours, tmp, maps)
        st.commit()
    print(f"wrote {out} (PowerInfer format, sparse_threshold {PEER_THRESHOLD})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
