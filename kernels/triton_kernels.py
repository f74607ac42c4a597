"""Triton epilogue kernels of the fused LM-head sparse KD loss, and their launchers.

The math (loss, and dL/dx = a1 softmax(x) + aT softmax(x / T) + sparse terms) is in the module
docstring of `kernels.divergences`. The logits x = h W^T of a chunk of rows are computed once, by
cuBLAS in the input dtype, into a [rows, V] buffer; these kernels then work on that buffer:
  * `_chunk_statistics_kernel` (read 1): per row an online (max, sum exp) of x and of x / T,
    giving LSE(x) and LSE(x / T), and x at the k teacher ids and the label, in fp32;
  * `_softmax_gradient_kernel` (read 2, the one write): overwrites x in place with
    a1 softmax(x) + aT softmax(x / T);
  * `_sparse_dlogits_kernel`: overwrites the k + 1 sparse entries of each row with their exact
    value (dense part + every correction on that id), computed in fp32 and rounded once.
With grad_h = dL/dx W and grad_W = dL/dx^T h as cuBLAS GEMMs that is 6 N H V FLOPs in all.
Pointer offsets that can pass 2^31 (row * stride) are computed in int64.

On a GPU the row kernels are autotuned over `GPU_TILES` (per vocabulary size); under
TRITON_INTERPRET=1 they run with the one `INTERPRETER_TILE`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton
import triton.language as tl
from torch import Tensor

# @triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class RowTile:
    """A [block_n rows, block_v columns] tile of the logits buffer, and the warps that run it."""

    block_n: int
    block_v: int
    num_warps: int

    @property
    def meta(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v}


# Memory-bound sweeps: wide rows of bf16/fp32 per program. Unmeasured starting points, to be
# pruned once `make bench-kernel` has run on a GPU.
GPU_TILES = (
    RowTile(2, 2048, 8),
    RowTile(4, 1024, 8),
    RowTile(4, 2048, 16),
    RowTile(8, 1024, 16),
    RowTile(2, 8192, 32),
)
# Few programs and wide tiles: the interpreter's cost is per program and per loop step.
INTERPRETER_TILE = RowTile(16, 256, 1)


def _tuned(kernel, **autotune_args):
    """kernel autotuned over GPU_TILES on a GPU; under the interpreter, kernel itself (launched
    with INTERPRETER_TILE's meta-parameters by `_tile_meta`)."""
    if INTERPRETED:
        return kernel
    configs = [triton.Config(t.meta, num_warps=t.num_warps) for t in GPU_TILES]
    return triton.autotune(configs, key=["vocab", "TEMPERED"], **autotune_args)(kernel)


def _tile_meta() -> dict[str, int]:
    return INTERPRETER_TILE.meta if INTERPRETED else {}


@triton.jit
def _chunk_statistics_kernel(
    x_ptr, ids_ptr, lse_ptr, lse_t_ptr, gathered_ptr,
    n_rows, vocab, n_ids, stride_x, inv_t,
    TEMPERED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """LSE(x) (and LSE(x / T)) per row by an online max / sum exp, and x at the row's ids."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_rows
    rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_x
    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_N,), tl.float32)
    row_sum_t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_mask = offs_v < vocab
        x = tl.load(rows + offs_v[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        # Rows past n_rows read 0 (finite); every tile holds a real column, so new_max is finite.
        x = tl.where(col_mask[None, :], x.to(tl.float32), float("-inf"))
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        shift = x - new_max[:, None]
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(shift), axis=1)
        if TEMPERED:
            row_sum_t = row_sum_t * tl.exp((row_max - new_max) * inv_t) + tl.sum(
                tl.exp(shift * inv_t), axis=1
            )
        row_max = new_max
    tl.store(lse_ptr + offs_n, row_max + tl.log(row_sum), mask=row_mask)
    if TEMPERED:
        tl.store(lse_t_ptr + offs_n, row_max * inv_t + tl.log(row_sum_t), mask=row_mask)

    offs_k = tl.arange(0, BLOCK_K)
    id_mask = row_mask[:, None] & (offs_k < n_ids)[None, :]
    id_offsets = offs_n.to(tl.int64)[:, None] * n_ids + offs_k[None, :]
    ids = tl.load(ids_ptr + id_offsets, mask=id_mask, other=0)
    picked = tl.load(rows + ids, mask=id_mask, other=0.0).to(tl.float32)
    tl.store(gathered_ptr + id_offsets, picked, mask=id_mask)


@triton.jit
def _softmax_gradient_kernel(
    x_ptr, lse_ptr, coef_ptr, lse_t_ptr, coef_t_ptr,
    n_rows, vocab, stride_x, inv_t,
    TEMPERED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """x <- coef * exp(x - lse) [+ coef_t * exp(x / T - lse_t)] on one tile, in place."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = offs_n < n_rows
    mask = row_mask[:, None] & (offs_v < vocab)[None, :]
    ptrs = x_ptr + offs_n.to(tl.int64)[:, None] * stride_x + offs_v[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=row_mask, other=0.0)
    dz = coef[:, None] * tl.exp(x - lse[:, None])
    if TEMPERED:
        lse_t = tl.load(lse_t_ptr + offs_n, mask=row_mask, other=0.0)
        coef_t = tl.load(coef_t_ptr + offs_n, mask=row_mask, other=0.0)
        dz += coef_t[:, None] * tl.exp(x * inv_t - lse_t[:, None])
    tl.store(ptrs, dz.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_dlogits_kernel(
    ids_ptr, gathered_ptr, sparse_ptr, lse_ptr, coef_ptr, lse_t_ptr, coef_t_ptr, dz_ptr,
    n_ids, stride_dz, inv_t, TEMPERED: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dz[row, id] = dense part at id + the sum of all sparse coefficients on that id (a label
    inside the top-k, or a repeated id, gets every correction), rounded once."""
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < n_ids
    ids = tl.load(ids_ptr + row * n_ids + offs_k, mask=k_mask, other=-1).to(tl.int64)
    x = tl.load(gathered_ptr + row * n_ids + offs_k, mask=k_mask, other=0.0)
    coefs = tl.load(sparse_ptr + row * n_ids + offs_k, mask=k_mask, other=0.0)
    same_id = (ids[:, None] == ids[None, :]) & k_mask[None, :]
    value = tl.sum(tl.where(same_id, coefs[None, :], 0.0), axis=1)
    value += tl.load(coef_ptr + row) * tl.exp(x - tl.load(lse_ptr + row))
    if TEMPERED:
        value += tl.load(coef_t_ptr + row) * tl.exp(x * inv_t - tl.load(lse_t_ptr + row))
    tl.store(dz_ptr + row * stride_dz + ids, value.to(dz_ptr.dtype.element_ty), mask=k_mask)


_chunk_statistics = _tuned(_chunk_statistics_kernel)
# Autotuning runs the kernel several times: each trial must start from the same logits.
_softmax_gradient = _tuned(_softmax_gradient_kernel, restore_value=["x_ptr"])


def chunk_statistics(
    logits: Tensor, ids: Tensor, inv_t: float | None,
    lse: Tensor, lse_t: Tensor | None, gathered: Tensor,
) -> None:
    """From logits [rows, V] (read once): lse [rows] = LSE(x), lse_t [rows] = LSE(x / T) unless
    inv_t is None, gathered [rows, m] = x[row, ids[row, j]] (ids [rows, m] int64); all fp32."""
    n_rows, vocab = logits.shape
    n_ids = ids.shape[1]
    tempered = inv_t is not None
    _chunk_statistics[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]),)](
        logits, ids, lse, lse_t if tempered else lse, gathered,
        n_rows, vocab, n_ids, logits.stride(0), inv_t if tempered else 1.0,
        TEMPERED=tempered, BLOCK_K=triton.next_power_of_2(n_ids), **_tile_meta(),
    )


def softmax_gradient_(
    logits: Tensor, lse: Tensor, coef: Tensor,
    lse_t: Tensor | None, coef_t: Tensor | None, inv_t: float,
) -> None:
    """logits [rows, V] <- coef softmax(x) [+ coef_t softmax(x / T)], in place."""
    n_rows, vocab = logits.shape
    tempered = lse_t is not None

    def grid(meta):
        return triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"])

    _softmax_gradient[grid](
        logits, lse, coef, lse_t if tempered else lse, coef_t if tempered else coef,
        n_rows, vocab, logits.stride(0), inv_t, TEMPERED=tempered, **_tile_meta(),
    )


def sparse_dlogits(
    ids: Tensor, gathered: Tensor, sparse: Tensor, lse: Tensor, coef: Tensor,
    lse_t: Tensor | None, coef_t: Tensor | None, inv_t: float, dz: Tensor,
) -> None:
    """Write the exact dL/dx at the k + 1 ids of every row into dz (after `softmax_gradient_`)."""
    n_rows, n_ids = ids.shape
    tempered = lse_t is not None
    _sparse_dlogits_kernel[(n_rows,)](
        ids, gathered, sparse, lse, coef, lse_t if tempered else lse,
        coef_t if tempered else coef, dz, n_ids, dz.stride(0), inv_t,
        TEMPERED=tempered, BLOCK_K=triton.next_power_of_2(n_ids),
    )
