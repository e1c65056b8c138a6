"""Per-layer activation predictors: which FFN neurons will fire for this token?

Shape (as PowerInfer's): score = fc2 @ act(fc1 @ x), fc1 [rank, n_embd], fc2 [n_ff, rank]; a neuron
is predicted active where score > threshold (one threshold per neuron here, one global value in
PowerInfer's files).

How ours are made (numpy, no training loop): in a ReLU-family FFN neuron j fires iff its gate
pre-activation g_j = w_j · x is positive, so the best rank-r predictor of g for inputs x with second
moment S = E[x x^T] is the rank-r truncation of W_gate in the metric of S: with S = L L^T (Cholesky),
take the SVD of W_gate L, keep r components, and map back (fc1 = S_r V_r^T L^-1, fc2 = U_r, act
none). That is the least-squares optimum of E||W x - fc2 fc1 x||^2; a randomized SVD computes it in
seconds for a 7B layer. The rest of g (what rank r misses) is treated as noise of per-neuron scale
sigma_j, and neuron j is predicted active where score_j > -m * sigma_j, one margin m per layer chosen
so that recall on the training tokens reaches the target. The rank per layer is the one that reads
the fewest bytes per token (predictor + predicted rows), within a cap on predictor size.

PowerInfer's published predictors (model_N.pt, torch) import as act relu with their threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Predictor:
    fc1: np.ndarray        # [rank, n_embd]
    fc2: np.ndarray        # [n_ff, rank]
    threshold: np.ndarray  # [n_ff]: active where score > threshold
    act: str = "none"      # "none" (ours) or "relu" (PowerInfer's)

    @property
    def rank(self) -> int:
        return self.fc1.shape[0]

    def scores(self, x: np.ndarray) -> np.ndarray:
        h = x @ self.fc1.T
        if self.act == "relu":
            h = np.maximum(h, 0)
        return h @ self.fc2.T

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x) > self.threshold

    def permuted(self, order: np.ndarray) -> "Predictor":
        """The same predictor for neurons renumbered by ``order`` (new j = old order[j])."""
        return Predictor(self.fc1, self.fc2[order], self.threshold[order], self.act)


@dataclass
class Quality:
    recall: float      # share of truly active neurons predicted active
    precision: float   # share of predicted neurons truly active
    predicted: float   # mean share of neurons predicted active
    actual: float      # mean share of neurons active


def quality(pred_mask: np.ndarray, true_mask: np.ndarray) -> Quality:
    tp = np.logical_and(pred_mask, true_mask).sum()
    return Quality(float(tp / max(true_mask.sum(), 1)), float(tp / max(pred_mask.sum(), 1)),
                   float(pred_mask.mean()), float(true_mask.mean()))


def randomized_svd(M: np.ndarray, rank: int, n_iter: int = 2, oversample: int = 16,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD of M (Halko, Martinsson & Tropp 2011), U [m, k], S [k], Vt [k, n]."""
    rng = np.random.default_rng(seed)
    k = min(rank + oversample, *M.shape)
    Y = M @ rng.standard_normal((M.shape[1], k)).astype(M.dtype)
    Q, _ = np.linalg.qr(Y)
    for _ in range(n_iter):
        Q, _ = np.linalg.qr(M.T @ Q)
        Q, _ = np.linalg.qr(M @ Q)
    Ub, S, Vt = np.linalg.svd(Q.T @ M, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vt[:rank]


def _margin_for_recall(scores: np.ndarray, sigma: np.ndarray, active: np.ndarray, target: float) -> float:
    """Smallest m with recall(score > -m*sigma) >= target on these tokens (bisection)."""
    pos = scores[active] / np.broadcast_to(sigma, scores.shape)[active]  # normalised scores of actives
    if pos.size == 0:
        return 0.0
    # recall(m) = share of pos > -m: m = -quantile(pos, 1 - target)
    return float(-np.nextafter(np.quantile(pos, 1 - target, method="lower"), -np.inf))


@dataclass
class FitResult:
    predictor: Predictor
    train: Quality          # on the calibration tokens that set the margins
    heldout: Quality
    bytes_per_token: float  # predictor reads + predicted FFN rows (F16 units), per token


def fit_layer(x_train: np.ndarray, g_train: np.ndarray, act_train: np.ndarray,
              x_held: np.ndarray, act_held: np.ndarray, w_gate: np.ndarray, *,
              recall: float = 0.99, rank: int | None = None, max_bytes_share: float = 0.15,
              ranks: tuple[int, ...] | None = None, train_steps: int = 0) -> FitResult:
    """Fit one layer's predictor. x: FFN inputs [T, n_embd] (after the norm); g: gate
    pre-activations [T, n_ff]; act: true active masks [T, n_ff]. ``rank`` fixes the rank; else the
    rank with the fewest bytes per token is chosen among ``ranks`` (default: powers of two and
    the cap), keeping the predictor within ``max_bytes_share`` of the FFN's bytes."""
    T, d = x_train.shape
    f = w_gate.shape[0]
    cap = int(max_bytes_share * 3 * d * f / (d + f))
    if rank is not None:
        if rank < 1:
            raise ValueError(f"predictor rank must be >= 1, got {rank}")
        candidates = [min(rank, d, f)]
    else:
        candidates = sorted({r for r in (ranks or (16, 32, 64, 128, 256, 512, 1024, 2048)) if r <= cap} | {min(cap, d, f)})
        candidates = [r for r in candidates if r >= 1] or [1]
    r_max = max(candidates)
    # The fit and the margins use different tokens: margins set on the tokens a predictor was
    # fitted to come out too small (seen at 7B with fewer calibration tokens than dimensions:
    # held-out recall 0.97 for a 0.995 training target). Rows are in sequence order, so the
    # last quarter is mostly other sequences.
    n_fit = T if T < 8 else int(T * 0.75)
    x_fit, x_cal = x_train[:n_fit], x_train[n_fit:] if n_fit < T else x_train
    g_cal, a_cal = (g_train[n_fit:], act_train[n_fit:]) if n_fit < T else (g_train, act_train)
    # Second moment of the inputs (plus a small ridge: calibration may hold fewer tokens than dims).
    S = (x_fit.T.astype(np.float64) @ x_fit) / n_fit
    S += np.eye(d) * (1e-4 * np.trace(S) / d + 1e-8)
    L = np.linalg.cholesky(S)
    # The SVD in float32: half the time and memory of float64 (a 7B layer's M is 11008 x 4096),
    # and gate weights stored in F16 carry no more precision than that.
    M = (w_gate.astype(np.float64) @ L).astype(np.float32)
    U, Sv, Vt = randomized_svd(M, r_max)
    del M
    U, Sv, Vt = U.astype(np.float64), Sv.astype(np.float64), Vt.astype(np.float64)
    # fc1 = S_r V_r^T L^-1  (solve L^T y = (S_r V_r^T)^T)
    fc1_full = np.linalg.solve(L.T, (Sv[:, None] * Vt).T).T  # [r_max, d]
    target = 1 - (1 - recall) / 2  # half the misses the target allows: a margin for unseen text
    best: FitResult | None = None
    best_cost = np.inf

    def linear(r: int) -> tuple[Predictor, np.ndarray]:
        """The rank-r truncation, its margins set on the calibration split; and the residual scale."""
        p = Predictor(fc1_full[:r].astype(np.float32), U[:, :r].astype(np.float32), np.zeros(f, np.float32))
        s_cal = p.scores(x_cal)
        sigma = np.maximum((g_cal - s_cal).std(axis=0), 1e-6).astype(np.float32)
        p.threshold = (-_margin_for_recall(s_cal, sigma, a_cal, target) * sigma).astype(np.float32)
        return p, sigma

    for r in candidates:
        p, _ = linear(r)
        q_cal = quality(p.predict(x_cal), a_cal)
        # bytes per token in F16 units: predictor matrices + gate/up/down rows of predicted neurons
        cost = 2 * r * (d + f) + 2 * 3 * d * f * q_cal.predicted
        if cost < best_cost:
            best_cost = cost
            best = FitResult(p, q_cal, quality(p.predict(x_held), act_held), cost)
    if train_steps > 0:
        # Refine within the same byte budget: the MLP has rank 2r, so start from rank cap/2.
        r = max(1, min(cap, d, f) // 2) if rank is None else max(1, rank // 2)
        lin, sigma = linear(r)
        mlp = _calibrate(train_mlp(x_fit, act_train[:n_fit], lin, sigma, steps=train_steps), x_cal, a_cal, target)
        q_cal = quality(mlp.predict(x_cal), a_cal)
        cost = 2 * mlp.rank * (d + f) + 2 * 3 * d * f * q_cal.predicted
        if cost < best_cost:
            best = FitResult(mlp, q_cal, quality(mlp.predict(x_held), act_held), cost)
    return best


def load_powerinfer_predictor(folder, layer: int, n_embd: int, n_ff: int, threshold: float | None = None) -> Predictor:
    """Layer ``layer`` of a PowerInfer predictor folder (model_N.pt: fc1.weight, fc2.weight; the
    threshold from the folder's config.json ``sparse_threshold`` where present, else 0)."""
    import json
    from pathlib import Path

    if threshold is None:
        cfg = Path(folder) / "config.json"
        try:
            threshold = float(json.loads(cfg.read_text()).get("sparse_threshold", 0.0)) if cfg.is_file() else 0.0
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"{cfg}: unreadable sparse_threshold") from None

    p = Path(folder) / f"model_{layer}.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{folder}: no model_{layer}.pt (PowerInfer predictor of layer {layer})")
    from .torchfile import load_state_dict

    sd = load_state_dict(p)  # no torch needed; only tensors are unpickled
    try:
        fc1 = sd["fc1.weight"].astype(np.float32)
        fc2 = sd["fc2.weight"].astype(np.float32)
    except KeyError as e:
        raise ValueError(f"{p}: no {e} (expected fc1.weight and fc2.weight)") from None
    if fc1.ndim != 2 or fc2.ndim != 2 or fc1.shape[1] != n_embd or fc2.shape != (n_ff, fc1.shape[0]):
        raise ValueError(f"{p}: shapes fc1 {list(fc1.shape)}, fc2 {list(fc2.shape)} do not fit "
                         f"n_embd {n_embd}, n_ff {n_ff}")
    return Predictor(fc1, fc2, np.full(n_ff, threshold, np.float32), "relu")


def evaluate_file(path, text: str, n_tokens: int = 4096, seq_len: int = 128, progress: bool = False) -> list[Quality]:
    """Recall and precision of the predictors stored in one of our GGUFs, per layer, on ``text``
    (e.g. text that calibration never saw), against the model's true firing (numpy forward)."""
    out: list[Quality] = []
    profile_file(path, text, lambda obs, p: out.append(quality(p.predict(obs.ffn_in), obs.active)),
                 n_tokens, seq_len, progress)
    return out


def profile_file(path, text: str, visit, n_tokens: int = 4096, seq_len: int = 128, progress: bool = False) -> None:
    """``text`` through one of our GGUFs (numpy forward, a layer at a time): ``visit(obs, predictor)``
    per layer with its profile.LayerObservation and the layer's stored Predictor."""
    import gguf
    import llama_cpp

    from . import format as fmt
    from .forward import Hparams
    from .model_file import ModelSizes
    from .profile import calibration_sequences, profile

    r = gguf.GGUFReader(path)
    if not bool(r.fields.get(fmt.Keys.SPARSE) and r.fields[fmt.Keys.SPARSE].contents()):
        raise ValueError(f"{path}: no predictors (not a sparse powerinfer file)")
    sz = ModelSizes.from_gguf(path)
    act = r.fields[fmt.HIDDEN_ACT_KEY.format(arch="llama")].contents()
    eps = r.fields["llama.attention.layer_norm_rms_epsilon"].contents()
    theta = r.fields["llama.rope.freq_base"].contents() if "llama.rope.freq_base" in r.fields else 10000.0
    hp = Hparams(sz.n_vocab, sz.n_embd, sz.n_ff, sz.n_layer, sz.n_head, sz.n_head_kv, act, theta, eps)
    tensors = {t.name: t for t in r.tensors}
    pact = r.fields[fmt.Keys.PREDICTOR_ACT].contents()

    def get(name: str) -> np.ndarray:
        if name.endswith("ffn_down.weight"):
            return get(name.replace("ffn_down", "ffn_down_t")).T
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    seqs = calibration_sequences(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False),
                                 text, n_tokens, seq_len, llm.token_bos())

    def observe(obs) -> None:
        il = obs.layer
        visit(obs, Predictor(get(fmt.Tensors.PRED_FC1.format(il)), get(fmt.Tensors.PRED_FC2.format(il)),
                             get(fmt.Tensors.PRED_THRESHOLD.format(il)), pact))

    profile(get, hp, seqs, observe, progress)


def train_mlp(x: np.ndarray, active: np.ndarray, init: Predictor, sigma: np.ndarray, *,
              steps: int = 300, batch: int = 256, lr: float = 2e-3, pos_weight: float = 4.0,
              seed: int = 0) -> Predictor:
    """Refine a linear predictor into PowerInfer's MLP shape by classification (numpy Adam).

    The linear rank-r predictor becomes an exact rank-2r ReLU MLP (relu(a) - relu(-a) = a):
    fc1' = [fc1; -fc1], fc2' = [fc2, -fc2] / sigma, plus a per-neuron bias. Training then
    minimises a recall-weighted binary cross-entropy on the true active masks, which a ReLU MLP
    can fit where no linear score can (learned, not built-in, sparsity). Thresholds are set
    afterwards by :func:`_calibrate` for the recall target. Returns act "relu"."""
    rng = np.random.default_rng(seed)
    W1 = np.concatenate([init.fc1, -init.fc1]).astype(np.float32)             # [2r, d]
    W2 = (np.concatenate([init.fc2, -init.fc2], axis=1) / sigma[:, None]).astype(np.float32)  # [f, 2r]
    c = (-init.threshold / sigma).astype(np.float32)                          # logit offset
    params = [W1, W2, c]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    T = len(x)
    y = active.astype(np.float32)
    for step in range(1, steps + 1):
        idx = rng.integers(0, T, min(batch, T))
        xb, yb = x[idx], y[idx]
        h_pre = xb @ W1.T
        h = np.maximum(h_pre, 0)
        z = h @ W2.T + c
        p = 1 / (1 + np.exp(-np.clip(z, -30, 30)))
        # d/dz of weighted BCE: w+ y (p - 1) + (1 - y) p
        g = (pos_weight * yb * (p - 1) + (1 - yb) * p) / len(idx)
        gW2 = g.T @ h
        gc = g.sum(axis=0)
        gh = (g @ W2) * (h_pre > 0)
        gW1 = gh.T @ xb
        for i, (prm, grd) in enumerate(zip(params, (gW1, gW2, gc))):
            m[i] = 0.9 * m[i] + 0.1 * grd
            v[i] = 0.999 * v[i] + 0.001 * grd * grd
            prm -= lr * (m[i] / (1 - 0.9 ** step)) / (np.sqrt(v[i] / (1 - 0.999 ** step)) + 1e-8)
    return Predictor(W1, W2, -c, "relu")


def _calibrate(p: Predictor, x: np.ndarray, active: np.ndarray, recall: float) -> Predictor:
    """Shift all thresholds by one margin so that recall on these tokens reaches ``recall``."""
    s = p.scores(x) - p.threshold  # > 0 where predicted
    pos = s[active]
    # the lower order statistic, nudged down: "> threshold" then keeps at least that share
    shift = float(np.nextafter(np.quantile(pos, 1 - recall, method="lower"), -np.inf)) if pos.size else 0.0
    return Predictor(p.fc1, p.fc2, (p.threshold + shift).astype(np.float32), p.act)
