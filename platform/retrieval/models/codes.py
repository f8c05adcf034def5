"""Binary hash codes (thesis ch. 3): real codes packed 8 bits a byte for Hamming search, and back.

The one place that fixes the bit order shared by the model's codes, the Hamming metrics, the
Faiss binary indices and the search service: `pack_codes` and its inverse `unpack_codes`.
"""

from __future__ import annotations

import numpy as np


def _real_codes(name: str, codes: np.ndarray) -> np.ndarray:
    array = np.asarray(codes)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of real codes [N, K], got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}): need at least one code")
    if array.shape[1] == 0 or array.shape[1] % 8 != 0:
        raise ValueError(
            f"{name} has K = {array.shape[1]} bits (shape {array.shape}); K must be a positive multiple of 8"
        )
    return array


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Pack real codes into bits for Hamming search (Faiss binary indices).

    Bit `k` of a code is 1 where `codes[:, k] > 0` and 0 otherwise (so `sign` codes in {-1, +1}
    and relaxed `tanh` codes give the same bits). Bits are packed as `np.packbits` does by default,
    most significant bit first: code dimension `k` is bit `7 - k % 8` of byte `k // 8`. Faiss binary
    indices (`IndexBinaryFlat`, HNSW, IVF) measure the Hamming distance as the popcount of the XOR
    of these bytes, which equals the number of dimensions whose signs differ.

    Args:
        codes: Real codes `[N, K]`, `K` a positive multiple of 8.

    Returns:
        Packed codes `[N, K / 8]` uint8.

    Raises:
        ValueError: `codes` is not 2-D, is empty, or `K` is not a multiple of 8.

    >>> pack_codes(np.array([[1.0, -1, -1, -1, -1, -1, -1, 0.5]])).tolist()
    [[129]]
    """
    array = _real_codes("codes", codes)
    return np.packbits(array > 0, axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack codes packed 8 bits a byte back to sign codes: the inverse of `pack_codes`.

    Args:
        packed: ``uint8 [N, bits / 8]`` (or ``[bits / 8]``), first code bit in the highest bit
            of the first byte (``np.packbits``' order).
        bits: the code length.

    Returns:
        ``float32 [N, bits]`` (or ``[bits]``) of +1.0 (bit set) and -1.0 (bit clear).
    """
    unpacked = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=bits)
    return unpacked.astype(np.float32) * 2.0 - 1.0
