"""The truncated SVD a LoRA is cut from, through the smaller Gram matrix: for D (m × n, m ≤ n)
the eigenvectors of D·Dᵀ are D's left singular vectors and its eigenvalues the squared singular
values, so D_r = U_r·U_rᵀ·D (Eckart–Young) costs one product and one m × m eigendecomposition
(about 14× less time than a full SVD of a 1280 × 11520 convolution here). The product is
taken in the compute dtype and the eigendecomposition in float64: in float32 a kept singular
value 10⁻⁴ of the largest comes out about 10⁻⁴ off, below the fp16 rounding of the factors
written; give compute_dtype fp64 for exact factors."""

from __future__ import annotations

import torch


def gram_spectrum(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(σ², their vectors) in decreasing order, from the smaller side's Gram matrix (float64
    eigendecomposition); and whether that side is the columns (the matrix was transposed)."""
    transposed = matrix.shape[0] > matrix.shape[1]
    side = matrix.T if transposed else matrix
    gram = (side @ side.T).double()  # in the compute dtype: see the module's note
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp(min=0), vectors.flip(1), transposed


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up·down the best rank-`rank` approximation of `matrix`: up = U_r·√S_r
    (m × r), down = √S_r·V_rᵀ (r × n), in the matrix's dtype."""
    values, vectors, transposed = gram_spectrum(matrix)
    keep = min(rank, values.numel())
    basis = vectors[:, :keep].to(matrix.dtype)
    singular = values[:keep].sqrt()
    root = singular.sqrt().to(matrix.dtype)  # (products below in the matrix's dtype)
    safe = torch.where(singular > 0, root, torch.ones_like(root))
    if transposed:  # the basis spans D's rows: D_r = (D·V_r)·V_rᵀ
        up = (matrix @ basis) / safe
        return torch.where(singular > 0, up, 0), basis.T * root[:, None]
    down = (basis.T @ matrix) / safe[:, None]
    return basis * root, torch.where(singular[:, None] > 0, down, 0)
