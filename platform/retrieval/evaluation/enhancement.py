"""Post-processing of retrieval embeddings (thesis ch. 2): PCA-whitening and query expansion.

Pure numpy (and Faiss for the exact neighbour search of query expansion); no torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.evaluation.metrics import knn_search

logger = logging.getLogger(__name__)


def _as_float64_matrix(name: str, array: np.ndarray) -> np.ndarray:
    matrix = np.asarray(array, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {matrix.shape}")
    return matrix


def _l2_normalise(matrix: np.ndarray) -> np.ndarray:
    # A zero row stays zero instead of becoming NaN.
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


class PCAWhitening:
    """PCA-whitening learned on a held-out set, then L2 normalisation.

    Jegou & Chum, "Negative evidences and co-occurrences in image retrieval: the benefit of
    PCA and whitening", ECCV 2012, sec. 2: centre on the mean, project on the top `dim`
    eigenvectors of the covariance and divide each coordinate by `sqrt(eigenvalue + eps)`:
    `y = diag(lambda + eps)^(-shrinkage/2) E^T (x - mean)`, then `y / ||y||`.

    Build one with `PCAWhitening.fit` or `PCAWhitening.load`.

    Args:
        mean: `[D]`, the training mean.
        projection: `[D, dim]`, the whitening projection (eigenvectors scaled column by column).
    """

    def __init__(self, *, mean: np.ndarray, projection: np.ndarray) -> None:
        mean_vector = np.asarray(mean, dtype=np.float64)
        projection_matrix = np.asarray(projection, dtype=np.float64)
        if mean_vector.ndim != 1 or projection_matrix.ndim != 2 or projection_matrix.shape[0] != mean_vector.shape[0]:
            raise ValueError(
                f"PCA-whitening needs mean [D] and projection [D, dim], got {mean_vector.shape} and "
                f"{projection_matrix.shape}"
            )
        self.mean = mean_vector
        self.projection = projection_matrix

    @property
    def input_dim(self) -> int:
        """D, the dimension of the vectors it transforms."""
        return int(self.mean.shape[0])

    @property
    def output_dim(self) -> int:
        """dim, the dimension of the whitened vectors."""
        return int(self.projection.shape[1])

    @classmethod
    def fit(
        cls, vectors: np.ndarray, *, dim: int | None = None, eps: float = 1e-6, shrinkage: float = 1.0
    ) -> PCAWhitening:
        """Learn the whitening from held-out vectors `[N, D]` (not the query or database set).

        Args:
            vectors: `[N, D]`, N >= 2.
            dim: output dimension, at most `min(N - 1, D)` (centred data have rank at most
                N - 1, and a zero-variance direction would be amplified noise); None keeps that maximum.
            eps: added to every eigenvalue before dividing, so that tiny ones do not blow up.
            shrinkage: exponent applied to the whitening scale: 1 is full whitening (unit variance
                per component), 0 a plain PCA rotation, in between a partial whitening.

        Raises:
            ValueError: not a 2-D array, fewer than 2 vectors, or `dim` out of range.
        """
        matrix = _as_float64_matrix("vectors", vectors)
        count, input_dim = matrix.shape
        if count < 2:
            raise ValueError(f"PCA-whitening needs at least 2 training vectors, got {count}")
        max_dim = min(count - 1, input_dim)
        output_dim = max_dim if dim is None else dim
        if not 1 <= output_dim <= max_dim:
            raise ValueError(
                f"dim must lie in [1, {max_dim}] = [1, min(N - 1, D)] for N={count} vectors of D={input_dim}, "
                f"got dim={dim}"
            )
        if eps < 0 or shrinkage < 0:
            raise ValueError(f"eps and shrinkage must be >= 0, got eps={eps}, shrinkage={shrinkage}")
        mean = matrix.mean(axis=0)
        # SVD of the centred data: right singular vectors are the covariance eigenvectors,
        # without forming the D x D covariance, and sorted by decreasing eigenvalue.
        _, singular_values, right_vectors = np.linalg.svd(matrix - mean, full_matrices=False)
        eigenvalues = singular_values[:output_dim] ** 2 / (count - 1)
        scale = (eigenvalues + eps) ** (-shrinkage / 2.0)
        projection = right_vectors[:output_dim].T * scale[None, :]
        logger.info("PCA-whitening fit on %d vectors: %d -> %d dimensions", count, input_dim, output_dim)
        return cls(mean=mean, projection=projection)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Whitened coordinates `[N, dim]` (float64), before the L2 normalisation."""
        matrix = _as_float64_matrix("vectors", vectors)
        if matrix.shape[1] != self.input_dim:
            raise ValueError(f"PCA-whitening was fit on {self.input_dim}-dimensional vectors, got shape {matrix.shape}")
        return (matrix - self.mean) @ self.projection

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """`[N, D]` -> whitened, L2-normalised `[N, dim]` float32."""
        return _l2_normalise(self.project(vectors)).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write `mean` and `projection` to an `.npz` file (numpy appends `.npz` if missing)."""
        target = Path(path)
        if target.suffix != ".npz":
            target = target.with_name(target.name + ".npz")
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, mean=self.mean, projection=self.projection)
        return target

    @classmethod
    def load(cls, path: str | Path) -> PCAWhitening:
        """Read a file written by `save`.

        Raises:
            FileNotFoundError: no such file.
            RetrievalError: the file is not an npz holding a consistent `mean` and `projection`.
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no PCA-whitening file")
        try:
            with np.load(source, allow_pickle=False) as stored:
                mean, projection = stored["mean"], stored["projection"]
        except (KeyError, ValueError, OSError) as error:
            raise RetrievalError(
                f"{source}: not a PCA-whitening file (an npz with 'mean' and 'projection'): {error}"
            ) from error
        try:
            return cls(mean=mean, projection=projection)
        except ValueError as error:
            raise RetrievalError(f"{source}: {error}") from error


def _neighbours(
    queries: np.ndarray, database: np.ndarray, *, top_n: int, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-n `(similarities [Q, n], indices [Q, n])` after shape checks."""
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but the database has {database.shape[1]}")
    if exclude_self and queries.shape[0] != database.shape[0]:
        raise ValueError(
            f"exclude_self needs the queries to be the database items in order, got {queries.shape[0]} queries "
            f"for {database.shape[0]} database items"
        )
    available = database.shape[0] - int(exclude_self)
    if not 0 <= top_n <= available:
        raise ValueError(f"top_n must lie in [0, {available}] for a database of that size, got {top_n}")
    if top_n == 0:
        empty = np.zeros((queries.shape[0], 0))
        return empty, empty.astype(np.int64)
    similarities, indices = knn_search(
        queries=queries, gallery=database, k=top_n, metric="ip", exclude_self=exclude_self
    )
    return similarities.astype(np.float64), indices


def average_query_expansion(
    queries: np.ndarray, database: np.ndarray, *, top_n: int, exclude_self: bool = False
) -> np.ndarray:
    """Average query expansion (AQE): each query becomes the mean of itself and its top-n neighbours.

    Chum et al., "Total Recall", ICCV 2007. Neighbours are found by exact inner-product search in
    `database`; with L2-normalised inputs that is cosine similarity. If the queries are also in
    the database, a query is among its own neighbours unless `exclude_self` (leave-one-out
    protocols, where `queries` is `database` in the same order).

    Args:
        queries: `[Q, D]`, L2-normalised.
        database: `[N, D]`, L2-normalised.
        top_n: neighbours averaged in, 0..N; 0 returns the normalised queries.

    Returns:
        `[Q, D]` float32, L2-normalised.

    >>> database = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> print(average_query_expansion(np.array([[0.6, 0.8]]), database, top_n=1).round(4))
    [[0.3162 0.9487]]
    """
    query_matrix = _as_float64_matrix("queries", queries)
    database_matrix = _as_float64_matrix("database", database)
    _, indices = _neighbours(query_matrix, database_matrix, top_n=top_n, exclude_self=exclude_self)
    expanded = (query_matrix + database_matrix[indices].sum(axis=1)) / (top_n + 1)
    return _l2_normalise(expanded).astype(np.float32)


def alpha_query_expansion(
    queries: np.ndarray, database: np.ndarray, *, top_n: int, alpha: float = 3.0, exclude_self: bool = False
) -> np.ndarray:
    """alpha-weighted query expansion (alpha-QE): neighbours weighted by similarity^alpha.

    Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2019,
    sec. 5.1: `q' = normalise(q + sum_{i <= n} max(s_i, 0)^alpha d_i)`, with `s_i = <q, d_i>`;
    the query itself weighs 1. alpha = 0 is AQE (up to the normalisation). Negative
    similarities are clamped to 0, so a non-integer alpha stays real.

    Args:
        queries: `[Q, D]`, L2-normalised.
        database: `[N, D]`, L2-normalised.
        top_n: neighbours weighted in, 0..N; 0 returns the normalised queries.
        alpha: exponent of the similarity weights, >= 0.
        exclude_self: `queries` is `database` in the same order; a query is not its own neighbour.

    Returns:
        `[Q, D]` float32, L2-normalised.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    query_matrix = _as_float64_matrix("queries", queries)
    database_matrix = _as_float64_matrix("database", database)
    similarities, indices = _neighbours(query_matrix, database_matrix, top_n=top_n, exclude_self=exclude_self)
    weights = np.maximum(similarities, 0.0) ** alpha
    expanded = query_matrix + np.einsum("qn,qnd->qd", weights, database_matrix[indices])
    return _l2_normalise(expanded).astype(np.float32)
