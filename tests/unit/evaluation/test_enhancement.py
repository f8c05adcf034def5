"""PCA-whitening against its definition and scikit-learn; query expansion against plain loops."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA

from retrieval.errors import RetrievalError
from retrieval.evaluation.enhancement import PCAWhitening, alpha_query_expansion, average_query_expansion


def _correlated_vectors(count: int, dim: int, *, seed: int) -> np.ndarray:
    """Vectors with very unequal variances along rotated axes, offset from the origin."""
    generator = np.random.default_rng(seed)
    mixing = generator.normal(size=(dim, dim)) * np.linspace(3.0, 0.1, dim)[:, None]
    return generator.normal(size=(count, dim)) @ mixing + generator.normal(size=dim) * 5.0


def _unit_rows(count: int, dim: int, *, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_whitened_training_vectors_have_zero_mean_and_identity_covariance() -> None:
    train = _correlated_vectors(500, 12, seed=0)
    whitening = PCAWhitening.fit(train, dim=8, eps=0.0)
    projected = whitening.project(train)
    assert projected.shape == (500, 8)
    np.testing.assert_allclose(projected.mean(axis=0), np.zeros(8), atol=1e-10)
    np.testing.assert_allclose(np.cov(projected, rowvar=False), np.eye(8), atol=1e-8)


def test_eps_shrinks_the_whitened_variance_to_lambda_over_lambda_plus_eps() -> None:
    train = _correlated_vectors(300, 6, seed=1)
    eps = 0.5
    whitening = PCAWhitening.fit(train, eps=eps)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(train, rowvar=False)))[::-1][: whitening.output_dim]
    variances = np.var(whitening.project(train), axis=0, ddof=1)
    np.testing.assert_allclose(variances, eigenvalues / (eigenvalues + eps), rtol=1e-8)


def test_transform_matches_sklearn_whitened_pca_up_to_the_sign_of_each_component() -> None:
    train, test = _correlated_vectors(400, 10, seed=2), _correlated_vectors(20, 10, seed=3)
    whitening = PCAWhitening.fit(train, dim=6, eps=0.0)
    reference = PCA(n_components=6, whiten=True, svd_solver="full").fit(train).transform(test)
    projected = whitening.project(test)
    for component in range(6):
        sign = math.copysign(1.0, float(projected[:, component] @ reference[:, component]))
        np.testing.assert_allclose(sign * projected[:, component], reference[:, component], rtol=1e-7, atol=1e-9)
    # transform = project, then every row divided by its norm.
    transformed = whitening.transform(test)
    assert transformed.shape == (20, 6) and transformed.dtype == np.float32
    for row in range(20):
        norm = math.sqrt(sum(value**2 for value in projected[row]))
        np.testing.assert_allclose(transformed[row], projected[row] / norm, rtol=1e-5, atol=1e-6)


def test_shrinkage_zero_is_a_plain_pca_rotation() -> None:
    train = _correlated_vectors(200, 5, seed=4)
    rotation = PCAWhitening.fit(train, shrinkage=0.0)
    assert rotation.output_dim == 5
    centred = train - train.mean(axis=0)
    np.testing.assert_allclose(np.linalg.norm(rotation.project(train), axis=1), np.linalg.norm(centred, axis=1))


def test_default_dim_is_min_of_n_minus_one_and_d() -> None:
    assert PCAWhitening.fit(_correlated_vectors(50, 8, seed=5)).output_dim == 8
    assert PCAWhitening.fit(_correlated_vectors(5, 8, seed=5)).output_dim == 4


def test_bad_shapes_and_dims_are_errors() -> None:
    train = _correlated_vectors(10, 8, seed=6)
    with pytest.raises(
        ValueError, match=r"dim must lie in \[1, 8\] = \[1, min\(N - 1, D\)\] for N=10 vectors of D=8, got dim=9"
    ):
        PCAWhitening.fit(train, dim=9)
    with pytest.raises(ValueError, match=r"dim must lie in \[1, 4\]"):
        PCAWhitening.fit(train[:5], dim=5)
    with pytest.raises(ValueError, match="at least 2 training vectors"):
        PCAWhitening.fit(train[:1])
    with pytest.raises(ValueError, match="must be a 2-D array"):
        PCAWhitening.fit(train[0])
    whitening = PCAWhitening.fit(train, dim=4)
    with pytest.raises(ValueError, match=r"fit on 8-dimensional vectors, got shape \(3, 7\)"):
        whitening.transform(np.zeros((3, 7)))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    train, test = _correlated_vectors(100, 6, seed=7), _correlated_vectors(5, 6, seed=8)
    whitening = PCAWhitening.fit(train, dim=4)
    path = whitening.save(tmp_path / "whitening")
    assert path == tmp_path / "whitening.npz"
    with np.load(path) as stored:
        assert sorted(stored.files) == ["mean", "projection"]
    loaded = PCAWhitening.load(path)
    np.testing.assert_array_equal(loaded.transform(test), whitening.transform(test))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.npz: no PCA-whitening file"):
        PCAWhitening.load(tmp_path / "missing.npz")
    wrong_keys = tmp_path / "wrong.npz"
    np.savez(wrong_keys, mean=np.zeros(3))
    with pytest.raises(RetrievalError, match=r"wrong.npz: not a PCA-whitening file"):
        PCAWhitening.load(wrong_keys)
    inconsistent = tmp_path / "inconsistent.npz"
    np.savez(inconsistent, mean=np.zeros(3), projection=np.zeros((4, 2)))
    with pytest.raises(RetrievalError, match=r"inconsistent.npz: PCA-whitening needs mean \[D\] and projection"):
        PCAWhitening.load(inconsistent)


def _plain_query_expansion(
    queries: np.ndarray, database: np.ndarray, *, top_n: int, alpha: float | None
) -> list[list[float]]:
    """QE by loops: rank the database by dot product, add the top-n (weighted by sim^alpha), normalise."""
    expanded = []
    for query in queries.tolist():
        similarities = [sum(q * d for q, d in zip(query, item, strict=True)) for item in database.tolist()]
        ranked = sorted(range(len(similarities)), key=lambda index: -similarities[index])[:top_n]
        total = list(query)
        for index in ranked:
            weight = 1.0 if alpha is None else max(similarities[index], 0.0) ** alpha
            total = [value + weight * item for value, item in zip(total, database[index].tolist(), strict=True)]
        if alpha is None:
            total = [value / (top_n + 1) for value in total]
        norm = math.sqrt(sum(value**2 for value in total))
        expanded.append([value / norm for value in total])
    return expanded


@pytest.mark.parametrize("top_n", [1, 3, 10])
def test_average_query_expansion_matches_a_plain_loop(top_n: int) -> None:
    queries, database = _unit_rows(6, 8, seed=10), _unit_rows(30, 8, seed=11)
    expanded = average_query_expansion(queries, database, top_n=top_n)
    assert expanded.shape == (6, 8) and expanded.dtype == np.float32
    expected = _plain_query_expansion(queries, database, top_n=top_n, alpha=None)
    np.testing.assert_allclose(expanded, np.array(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("top_n", "alpha"), [(1, 3.0), (5, 3.0), (10, 1.5)])
def test_alpha_query_expansion_matches_a_plain_loop(top_n: int, alpha: float) -> None:
    queries, database = _unit_rows(6, 8, seed=12), _unit_rows(30, 8, seed=13)
    expanded = alpha_query_expansion(queries, database, top_n=top_n, alpha=alpha)
    expected = _plain_query_expansion(queries, database, top_n=top_n, alpha=alpha)
    np.testing.assert_allclose(expanded, np.array(expected), rtol=1e-5, atol=1e-6)


def test_top_n_zero_returns_the_normalised_queries() -> None:
    queries, database = _unit_rows(4, 5, seed=14) * 3.0, _unit_rows(10, 5, seed=15)
    expected = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(average_query_expansion(queries, database, top_n=0), expected, rtol=1e-6)
    np.testing.assert_allclose(alpha_query_expansion(queries, database, top_n=0), expected, rtol=1e-6)


def test_alpha_zero_is_average_query_expansion() -> None:
    queries, database = _unit_rows(4, 5, seed=16), _unit_rows(10, 5, seed=17)
    np.testing.assert_allclose(
        alpha_query_expansion(queries, database, top_n=4, alpha=0.0),
        average_query_expansion(queries, database, top_n=4),
        rtol=1e-6,
    )


def test_query_expansion_errors() -> None:
    queries, database = _unit_rows(2, 4, seed=18), _unit_rows(5, 4, seed=19)
    with pytest.raises(ValueError, match=r"top_n must lie in \[0, 5\]"):
        average_query_expansion(queries, database, top_n=6)
    with pytest.raises(ValueError, match="queries have dimension 3 but the database has 4"):
        alpha_query_expansion(queries[:, :3], database, top_n=2)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        alpha_query_expansion(queries, database, top_n=2, alpha=-1.0)


@pytest.mark.parametrize("alpha", [None, 3.0])
def test_leave_one_out_expansion_never_uses_the_query_itself(alpha: float | None) -> None:
    items = _unit_rows(12, 6, seed=20)
    if alpha is None:
        expanded = average_query_expansion(items, items, top_n=3, exclude_self=True)
    else:
        expanded = alpha_query_expansion(items, items, top_n=3, alpha=alpha, exclude_self=True)
    for index in range(len(items)):
        others = np.delete(items, index, axis=0)
        expected = _plain_query_expansion(items[index : index + 1], others, top_n=3, alpha=alpha)
        np.testing.assert_allclose(expanded[index], np.array(expected[0]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exclude_self needs the queries to be the database items"):
        average_query_expansion(items[:3], items, top_n=1, exclude_self=True)
