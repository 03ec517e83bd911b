"""metrics: the Frechet distance and the Inception Score against float64 references and closed forms (no network)."""
import subprocess, sys

import numpy as np
import pytest

from heptapod_nb.metrics import feature_stats, frechet_distance, inception_score


# ---------------------------------------------------------------- Frechet distance vs float64 references

def _ref_frechet(mu1, s1, mu2, s2):
    "Independent float64 reference: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions."
    def psd_sqrt(S):
        w, V = np.linalg.eigh(S); return (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    r = psd_sqrt(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r @ s2 @ r)))


def test_frechet_closed_form_diagonal_and_rotated():
    rng = np.random.default_rng(1)
    D = 32
    a, b = rng.uniform(0.05, 4, D), rng.uniform(0.05, 4, D)
    m1, m2 = rng.normal(size=D), rng.normal(size=D)
    exact = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert abs(frechet_distance(m1, np.diag(a), m2, np.diag(b)) - exact) < 1e-9
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    got = frechet_distance(Q @ m1, Q @ np.diag(a) @ Q.T, Q @ m2, Q @ np.diag(b) @ Q.T)
    assert abs(got - exact) < 1e-6 * max(1, exact)
    assert isinstance(got, float)


def test_frechet_univariate_and_general_dense():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert abs(frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) - (4 + 1)) < 1e-12
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(400, 16)), rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5
    (m1, s1), (m2, s2) = feature_stats(X), feature_stats(Y)
    assert abs(frechet_distance(m1, s1, m2, s2) - _ref_frechet(m1, s1, m2, s2)) < 1e-7 * _ref_frechet(m1, s1, m2, s2)
    # float32 statistics in -> the same answer (computed in float64): measured relative error 7.3e-10; bound 1e-6
    ref = _ref_frechet(m1, s1, m2, s2)
    assert abs(frechet_distance(m1.astype(np.float32), s1.astype(np.float32), m2, s2) - ref) < 1e-6 * ref


def test_frechet_singular_fallback_and_errors():
    rng = np.random.default_rng(3)
    D = 50
    v = rng.normal(size=(D, 2)); S = v @ v.T                              # rank 2
    m1, m2 = rng.normal(size=D), rng.normal(size=D)
    got, exact = frechet_distance(m1, S, m2, S), ((m1 - m2) ** 2).sum()
    # the eps*I fallback perturbs the answer: measured relative error 1.4e-7 (value 83.4); bound 1e-5
    assert np.isfinite(got) and abs(got - exact) < 1e-5 * exact
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(m1, S, m2[:4], S)
    with pytest.raises(ValueError, match="covariances must both be"):
        frechet_distance(m1, S[:4, :4], m2, S)


def test_inception_score_known_values():
    assert abs(inception_score(np.zeros((50, 1008)), splits=5)[0] - 1.0) < 1e-9
    conf = np.eye(20)[np.arange(200) % 20] * 100                      # confident, balanced over 20 classes
    m, s = inception_score(conf, splits=10)
    assert abs(m - 20) < 1e-6 and s < 1e-6
    with pytest.raises(ValueError, match="splits"):
        inception_score(conf, splits=0)


def test_metrics_imports_no_network():
    "The math stays one layer below the networks: importing it loads neither Inception nor the classifier."
    code = "import sys, heptapod_nb.metrics; print(sorted(m for m in sys.modules if m.startswith('heptapod_nb')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['heptapod_nb', 'heptapod_nb.metrics']", out
