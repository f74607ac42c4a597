"""Triton kernels for the fused LM-head sparse KD loss, and their launchers.

The math (loss, and dL/dx = a1 softmax(x) + aT softmax(x / T) + sparse terms) is in the module
docstring of `kernels.divergences`. Here x = h W^T is only ever built tile by tile in registers
(fp32 accumulation) by `_logit_tile`:
  * `_lse_partials_kernel`: per row block and vocabulary split, an online (max, sum exp) of x and
    of x / T; `row_logsumexp` combines the splits deterministically in torch;
  * `_gather_logits_kernel`: x at the k teacher ids and the label, as fp32 dot products;
  * `_dense_dlogits_kernel`: recomputes a tile of x and writes a1 softmax(x) + aT softmax(x / T)
    for a chunk of rows;
  * `_sparse_dlogits_kernel`: overwrites the k + 1 sparse entries of each row with their exact
    value (dense part + every correction on that id), computed in fp32 and rounded once.
The logit tiles are computed twice (statistics, then dL/dx), and grad_h = dL/dx W and
grad_W = dL/dx^T h are cuBLAS GEMMs on a chunk of dL/dx: 8 N H V FLOPs in all, with no logits
stored. Pointer offsets that can pass 2^31 (row * stride, id * H) are computed in int64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# @triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    upcast: bool  # tl.dot on bf16/fp16 tiles is wrong in the interpreter: multiply in fp32 there
    precision: str  # "ieee" for fp32 inputs: tl.dot would otherwise use tf32 on GPU

    @property
    def launch(self) -> dict[str, object]:
        return dict(
            BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h, UPCAST=self.upcast,
            PRECISION=self.precision, num_warps=self.num_warps, num_stages=self.num_stages,
        )


def tile_config(dtype: torch.dtype) -> TileConfig:
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if INTERPRETED:
        return TileConfig(32, 128, 64, 1, 1, upcast=True, precision="ieee")
    if dtype == torch.float32:
        return TileConfig(64, 64, 32, 4, 3, upcast=False, precision=precision)
    return TileConfig(128, 128, 64, 8, 3, upcast=False, precision=precision)


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, offs_n, offs_v, n_rows, vocab, hidden_size, stride_h, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """x[offs_n, offs_v] = h[offs_n] . W[offs_v] in fp32; rows/columns out of range give 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_mask = offs_n < n_rows
    col_mask = offs_v < vocab
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_h
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_w
    for start in range(0, hidden_size, BLOCK_H):
        offs_h = start + tl.arange(0, BLOCK_H)
        h_mask = offs_h < hidden_size
        a = tl.load(h_rows + offs_h[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        b = tl.load(w_cols + offs_h[:, None], mask=h_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_partials_kernel(
    h_ptr, w_ptr, max_ptr, sum_ptr, sum_t_ptr,
    n_rows, vocab, hidden_size, stride_h, stride_w, inv_t, cols_per_split,
    TEMPERED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online max and sum exp(x - max) (and sum exp((x - max) / T)) over one vocabulary split."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab)
    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_N,), tl.float32)
    row_sum_t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        x = _logit_tile(
            h_ptr, w_ptr, offs_n, offs_v, n_rows, vocab, hidden_size, stride_h, stride_w,
            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
        )
        x = tl.where((offs_v < v_end)[None, :], x, float("-inf"))
        # Every tile holds at least one real column, so new_max is finite.
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        shift = x - new_max[:, None]
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(shift), axis=1)
        if TEMPERED:
            row_sum_t = row_sum_t * tl.exp((row_max - new_max) * inv_t) + tl.sum(
                tl.exp(shift * inv_t), axis=1
            )
        row_max = new_max
    out = split.to(tl.int64) * n_rows + offs_n
    row_mask = offs_n < n_rows
    tl.store(max_ptr + out, row_max, mask=row_mask)
    tl.store(sum_ptr + out, row_sum, mask=row_mask)
    if TEMPERED:
        tl.store(sum_t_ptr + out, row_sum_t, mask=row_mask)


@triton.jit
def _gather_logits_kernel(
    h_ptr, w_ptr, ids_ptr, out_ptr, hidden_size, n_ids, stride_h, stride_w,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[row, j] = h[row] . W[ids[row, j]] in fp32."""
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < n_ids
    ids = tl.load(ids_ptr + row * n_ids + offs_k, mask=k_mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(0, hidden_size, BLOCK_H):
        offs_h = start + tl.arange(0, BLOCK_H)
        h_mask = offs_h < hidden_size
        h = tl.load(h_ptr + row * stride_h + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + ids[:, None] * stride_w + offs_h[None, :],
            mask=k_mask[:, None] & h_mask[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * h[None, :], axis=1)
    tl.store(out_ptr + row * n_ids + offs_k, acc, mask=k_mask)


@triton.jit
def _dense_dlogits_kernel(
    h_ptr, w_ptr, lse_ptr, coef_ptr, lse_t_ptr, coef_t_ptr, dz_ptr,
    n_rows, vocab, hidden_size, stride_h, stride_w, stride_dz, inv_t,
    TEMPERED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dz = coef * exp(x - lse) [+ coef_t * exp(x / T - lse_t)] on one tile."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    x = _logit_tile(
        h_ptr, w_ptr, offs_n, offs_v, n_rows, vocab, hidden_size, stride_h, stride_w,
        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
    )
    row_mask = offs_n < n_rows
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=row_mask, other=0.0)
    dz = coef[:, None] * tl.exp(x - lse[:, None])
    if TEMPERED:
        lse_t = tl.load(lse_t_ptr + offs_n, mask=row_mask, other=0.0)
        coef_t = tl.load(coef_t_ptr + offs_n, mask=row_mask, other=0.0)
        dz += coef_t[:, None] * tl.exp(x * inv_t - lse_t[:, None])
    ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz + offs_v[None, :]
    mask = row_mask[:, None] & (offs_v < vocab)[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


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


def _program_target() -> int:
    """About how many programs fill the device."""
    if INTERPRETED or not torch.cuda.is_available():
        return 4
    return 4 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def lse_splits(n_rows: int, vocab: int, config: TileConfig) -> tuple[int, int]:
    """(number of vocabulary splits, columns per split): enough programs to fill the device,
    each split a whole number of tiles and none empty."""
    row_blocks = triton.cdiv(n_rows, config.block_n)
    tiles = triton.cdiv(vocab, config.block_v)
    wanted = max(1, min(tiles, triton.cdiv(_program_target(), row_blocks)))
    cols_per_split = triton.cdiv(tiles, wanted) * config.block_v
    return triton.cdiv(vocab, cols_per_split), cols_per_split


def lse_partials(
    hidden: Tensor, weight: Tensor, inv_t: float | None,
    partial_max: Tensor, partial_sum: Tensor, partial_sum_t: Tensor | None,
) -> None:
    """Fill [splits, N] partial stats (see `lse_splits`); inv_t None: no tempered sums."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    config = tile_config(hidden.dtype)
    splits, cols_per_split = lse_splits(n_rows, vocab, config)
    grid = (triton.cdiv(n_rows, config.block_n), splits)
    tempered = inv_t is not None
    _lse_partials_kernel[grid](
        hidden, weight, partial_max, partial_sum, partial_sum_t if tempered else partial_sum,
        n_rows, vocab, hidden_size, hidden.stride(0), weight.stride(0),
        inv_t if tempered else 1.0, cols_per_split, TEMPERED=tempered, **config.launch,
    )


def row_logsumexp(
    hidden: Tensor, weight: Tensor, temperature: float | None
) -> tuple[Tensor, Tensor | None]:
    """(LSE(x), LSE(x / T) or None) per row, fp32, without materialising x."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    splits, _ = lse_splits(n_rows, vocab, tile_config(hidden.dtype))
    tempered = temperature is not None
    stats = torch.empty(3 if tempered else 2, splits, n_rows, device=hidden.device)
    inv_t = 1.0 / temperature if tempered else None
    lse_partials(hidden, weight, inv_t, stats[0], stats[1], stats[2] if tempered else None)
    row_max = stats[0].amax(0)
    shift = stats[0] - row_max
    lse = row_max + (stats[1] * shift.exp()).sum(0).log()
    if not tempered:
        return lse, None
    return lse, row_max * inv_t + (stats[2] * (shift * inv_t).exp()).sum(0).log()


def gather_logits(hidden: Tensor, weight: Tensor, ids: Tensor, out: Tensor) -> None:
    """out[n, j] = x[n, ids[n, j]] in fp32; ids [N, m] contiguous, out [N, m] fp32."""
    n_rows, hidden_size = hidden.shape
    n_ids = ids.shape[1]
    block_h = min(64, triton.next_power_of_2(hidden_size))  # a [k + 1, block_h] fp32 tile
    _gather_logits_kernel[(n_rows,)](
        hidden, weight, ids, out, hidden_size, n_ids, hidden.stride(0), weight.stride(0),
        BLOCK_K=triton.next_power_of_2(n_ids), BLOCK_H=block_h,
    )


def dense_dlogits(
    hidden: Tensor, weight: Tensor, lse: Tensor, coef: Tensor,
    lse_t: Tensor | None, coef_t: Tensor | None, inv_t: float, dz: Tensor,
) -> None:
    """dz [rows, V] = coef softmax(x) [+ coef_t softmax(x / T)] for the rows of hidden."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    config = tile_config(hidden.dtype)
    tempered = lse_t is not None
    grid = (triton.cdiv(n_rows, config.block_n), triton.cdiv(vocab, config.block_v))
    _dense_dlogits_kernel[grid](
        hidden, weight, lse, coef, lse_t if tempered else lse, coef_t if tempered else coef, dz,
        n_rows, vocab, hidden_size, hidden.stride(0), weight.stride(0), dz.stride(0), inv_t,
        TEMPERED=tempered, **config.launch,
    )


def sparse_dlogits(
    ids: Tensor, gathered: Tensor, sparse: Tensor, lse: Tensor, coef: Tensor,
    lse_t: Tensor | None, coef_t: Tensor | None, inv_t: float, dz: Tensor,
) -> None:
    """Write the exact dL/dx at the k + 1 ids of every row into dz (after `dense_dlogits`)."""
    n_rows, n_ids = ids.shape
    tempered = lse_t is not None
    _sparse_dlogits_kernel[(n_rows,)](
        ids, gathered, sparse, lse, coef, lse_t if tempered else lse,
        coef_t if tempered else coef, dz, n_ids, dz.stride(0), inv_t,
        TEMPERED=tempered, BLOCK_K=triton.next_power_of_2(n_ids),
    )
