"""Predictors: the low-rank fit recovers a low-rank gate, recall targets hold, the MLP refinement."""
from __future__ import annotations

import numpy as np

from powerinfer_gguf.predictor import (Predictor, _calibrate, fit_layer, quality, randomized_svd,
                                       train_mlp)


def _layer(rng, T=3000, d=64, f=192, rank=8, noise=0.05):
    x = rng.standard_normal((T, d)).astype(np.float32)
    w = (rng.standard_normal((f, rank)) @ rng.standard_normal((rank, d)) / np.sqrt(rank * d)
         + rng.standard_normal((f, d)) * np.sqrt(noise / d)).astype(np.float32)
    w[:, 0] -= 1.2  # most neurons mostly off
    x[:, 0] = 1.0
    g = x @ w.T
    return x, g, g > 0, w


def test_randomized_svd_matches_numpy():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((80, 50)) @ np.diag(np.linspace(5, 0.01, 50)) @ rng.standard_normal((50, 50))
    U, S, Vt = randomized_svd(M, 10, n_iter=6)
    np.testing.assert_allclose(S, np.linalg.svd(M, compute_uv=False)[:10], rtol=1e-6)


def test_low_rank_gate_is_predicted_with_target_recall():
    rng = np.random.default_rng(1)
    x, g, a, w = _layer(rng)
    fit = fit_layer(x[:2400], g[:2400], a[:2400], x[2400:], a[2400:], w, recall=0.99)
    assert fit.heldout.recall >= 0.985 and fit.heldout.precision > 0.5
    assert fit.predictor.rank <= int(0.15 * 3 * 64 * 192 / (64 + 192))


def test_fixed_rank_full_is_exact():
    rng = np.random.default_rng(2)
    x, g, a, w = _layer(rng, noise=1.0)
    fit = fit_layer(x[:2400], g[:2400], a[:2400], x[2400:], a[2400:], w, recall=0.99, rank=64)
    assert fit.heldout.recall >= 0.99 and fit.heldout.precision > 0.97


def test_mlp_refinement_starts_from_the_linear_predictor_and_keeps_recall():
    rng = np.random.default_rng(3)
    x, g, a, w = _layer(rng, noise=0.5)
    U, S, Vt = randomized_svd(w.astype(np.float64), 8)
    lin = Predictor((S[:, None] * Vt).astype(np.float32), U.astype(np.float32), np.zeros(w.shape[0], np.float32))
    sigma = np.maximum((g - lin.scores(x)).std(axis=0), 1e-6).astype(np.float32)
    # zero steps: the rank-2r ReLU form scores exactly what the linear one does (scaled)
    same = train_mlp(x, a, lin, sigma, steps=0)
    np.testing.assert_allclose(same.scores(x[:50]), lin.scores(x[:50]) / sigma, rtol=1e-4, atol=1e-4)
    mlp = _calibrate(train_mlp(x[:2400], a[:2400], lin, sigma, steps=200), x[:2400], a[:2400], 0.995)
    assert quality(mlp.predict(x[:2400]), a[:2400]).recall >= 0.995
    assert mlp.act == "relu" and mlp.rank == 16
