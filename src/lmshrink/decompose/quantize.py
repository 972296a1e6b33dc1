"""Uniform k-bit quantization of a matrix, per row or per group of columns, with real bit packing.

Asymmetric min-max: each quantization group stores a float16 ``scale`` and ``minimum``; a value x becomes the
integer q = round((x - minimum) / scale) in 0 .. 2^bits - 1 and comes back as minimum + q * scale. Integers are
packed densely (bits * count / 8 bytes, rounded up), so 6-bit values really take 6 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmshrink.errors import InvalidArgument

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_CHUNK = 1 << 20  # values packed per chunk in the generic path (bounds the temporary bit matrix)


def check_bits(bits, argument: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise InvalidArgument(argument, f"{bits!r} bits is not supported", f"one of {SUPPORTED_BITS}")
    return bits


def check_group_size(group_size, columns: int, argument: str = "group_size") -> int | None:
    """None (or 0) means one group per row; otherwise a positive number of consecutive columns per group."""
    if group_size in (None, 0):
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise InvalidArgument(argument, f"{group_size!r} is not a positive integer", "0 (per row) or a number of columns >= 1")
    return min(group_size, columns)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Integers in [0, 2^bits) -> uint8 bytes, little-endian bit order, ceil(len * bits / 8) bytes."""
    check_bits(bits)
    values = values.flatten()
    if bits == 8:
        return values.to(torch.uint8).clone()
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = values.new_zeros(-(-values.numel() // per_byte) * per_byte, dtype=torch.int32)
        padded[: values.numel()] = values.to(torch.int32)
        shifts = torch.arange(per_byte, dtype=torch.int32, device=values.device) * bits
        return (padded.view(-1, per_byte) << shifts).sum(1).to(torch.uint8)
    out = []
    bit_positions = torch.arange(bits, dtype=torch.int32, device=values.device)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=values.device))
    # Chunks hold a multiple of 8 values, so each chunk's bit stream ends on a byte boundary.
    for start in range(0, values.numel(), _CHUNK):
        chunk = values[start:start + _CHUNK].to(torch.int32)
        stream = ((chunk[:, None] >> bit_positions) & 1).flatten()
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.view(-1, 8) * weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else values.new_zeros(0, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of pack_bits: the first ``count`` integers (int64)."""
    check_bits(bits)
    if bits == 8:
        return packed[:count].long()
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
        return ((packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)).flatten()[:count].long()
    out = []
    bytes_per_chunk = _CHUNK * bits // 8
    bit_positions = torch.arange(8, dtype=torch.int32, device=packed.device)
    weights = (1 << torch.arange(bits, dtype=torch.int64, device=packed.device))
    for start in range(0, packed.numel(), bytes_per_chunk):
        stream = ((packed[start:start + bytes_per_chunk].to(torch.int32)[:, None] >> bit_positions) & 1).flatten()
        usable = stream.numel() // bits * bits
        out.append((stream[:usable].view(-1, bits).long() * weights).sum(1))
    return torch.cat(out)[:count] if out else packed.new_zeros(0, dtype=torch.long)


@dataclass
class QuantizedMatrix:
    """A (rows, columns) matrix as packed integers plus one float16 scale and minimum per group."""

    packed: Tensor  # uint8
    scales: Tensor  # float16 (rows, groups per row)
    minimums: Tensor  # float16 (rows, groups per row)
    shape: tuple[int, int]
    bits: int
    group_size: int | None  # None: one group per row

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.minimums))


def _grouped(matrix: Tensor, group_size: int | None) -> tuple[Tensor, int]:
    """(rows, groups, size) view, the last group zero-padded; and the padded column count."""
    rows, columns = matrix.shape
    size = columns if group_size is None else group_size
    groups = -(-columns // size)
    padded = matrix.new_zeros(rows, groups * size)
    padded[:, :columns] = matrix
    return padded.view(rows, groups, size), groups * size


def quantize(matrix: Tensor, bits: int, group_size: int | None = None) -> QuantizedMatrix:
    """k-bit asymmetric uniform quantization with min-max range per row (``group_size`` None) or per column group."""
    check_bits(bits)
    if matrix.dim() != 2 or matrix.numel() == 0:
        raise InvalidArgument("matrix", f"shape {tuple(matrix.shape)}", "a non-empty 2-D matrix")
    rows, columns = matrix.shape
    group_size = check_group_size(group_size, columns)
    work = matrix.detach().float()
    grouped, _ = _grouped(work, group_size)
    size = grouped.shape[2]
    column = torch.arange(size, device=work.device)[None, None, :] + torch.arange(grouped.shape[1], device=work.device)[None, :, None] * size
    valid = column < columns
    low = torch.where(valid, grouped, torch.inf).amin(2)
    high = torch.where(valid, grouped, -torch.inf).amax(2)
    levels = (1 << bits) - 1
    # Store scale and minimum in float16 and quantize against the stored values, so dequantization is exact to them.
    minimums = low.to(torch.float16)
    scales = ((high - minimums.float()) / levels).to(torch.float16)
    scales = torch.where(scales.float() > 0, scales, torch.ones_like(scales))
    codes = torch.round((grouped - minimums.float()[..., None]) / scales.float()[..., None]).clamp(0, levels)
    codes = codes.view(rows, -1)[:, :columns]
    return QuantizedMatrix(pack_bits(codes.to(torch.int32), bits), scales, minimums, (rows, columns), bits, group_size)


def _range_of(columns: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """float16 (scale, minimum) per row for one group of columns, as ``quantize`` stores them."""
    low, high = columns.amin(1), columns.amax(1)
    minimums = low.to(torch.float16)
    scales = ((high - minimums.float()) / ((1 << bits) - 1)).to(torch.float16)
    return torch.where(scales.float() > 0, scales, torch.ones_like(scales)), minimums


def quantize_compensated(matrix: Tensor, bits: int, group_size: int | None, gram: Tensor, damping: float = 0.01,
                         block: int = 128) -> QuantizedMatrix:
    """k-bit quantization that minimizes the output error on calibration inputs, not the weight error (GPTQ,
    Frantar et al. 2023): columns are rounded one at a time, and each rounding error is spread over the columns not
    yet rounded, through the inverse of the input Gram ``gram`` (in, in) = sum of x x^T.

    Same storage as ``quantize`` (a group's range is taken when its first column is reached, from the weights as
    updated so far). ``damping`` is added to the Gram's diagonal as a share of its mean, so the inverse exists; with
    a Gram proportional to the identity nothing is spread and the result equals ``quantize``'s.
    """
    check_bits(bits)
    if matrix.dim() != 2 or matrix.numel() == 0:
        raise InvalidArgument("matrix", f"shape {tuple(matrix.shape)}", "a non-empty 2-D matrix")
    rows, columns = matrix.shape
    if tuple(gram.shape) != (columns, columns):
        raise InvalidArgument("gram", f"shape {tuple(gram.shape)}", f"({columns}, {columns}): the input Gram of a matrix with {columns} columns")
    group_size = check_group_size(group_size, columns)
    size = group_size or columns
    if group_size is not None:  # a block holds whole groups, so a group's range sees every earlier update
        block = size * max(1, block // size)
    levels = (1 << bits) - 1
    weight = matrix.detach().float().clone()
    upper = _inverse_gram_factor(gram, damping).to(weight)
    codes = torch.empty(rows, columns, dtype=torch.int32, device=weight.device)
    groups = -(-columns // size)
    scales = torch.empty(rows, groups, dtype=torch.float16, device=weight.device)
    minimums = torch.empty_like(scales)
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        part, errors = weight[:, start:stop], torch.empty(rows, stop - start, device=weight.device)
        for j in range(start, stop):
            local = j - start
            if j % size == 0:
                group = j // size
                # ``part`` is a view of ``weight``: the group's columns carry every update spread so far.
                scales[:, group], minimums[:, group] = _range_of(weight[:, j:min(j + size, columns)], bits)
            scale, minimum = scales[:, j // size].float(), minimums[:, j // size].float()
            code = torch.round((part[:, local] - minimum) / scale).clamp(0, levels)
            codes[:, j] = code.to(torch.int32)
            error = (part[:, local] - (minimum + code * scale)) / upper[j, j]
            part[:, local + 1:] -= error[:, None] * upper[j, j + 1:stop][None, :]
            errors[:, local] = error
        weight[:, stop:] -= errors @ upper[start:stop, stop:]
    return QuantizedMatrix(pack_bits(codes, bits), scales, minimums, (rows, columns), bits, group_size)


def _inverse_gram_factor(gram: Tensor, damping: float) -> Tensor:
    """Upper Cholesky factor of (G + damping * mean(diag G) I)^-1, in float64; inputs never seen count as unit ones
    (their columns are rounded plainly). The damping grows tenfold until the factorization succeeds."""
    work = gram.detach().double().clone()
    diagonal = work.diagonal()
    dead = diagonal <= 0
    work[dead, :] = 0
    work[:, dead] = 0
    diagonal[dead] = 1
    mean = float(diagonal.mean())
    for attempt in range(6):
        damped = work + (damping * 10 ** attempt) * mean * torch.eye(len(work), dtype=work.dtype, device=work.device)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise InvalidArgument("gram", "is not positive semi-definite (Cholesky failed even with 1e5 x the damping)",
                          "an input Gram sum of x x^T from calibration")


def dequantize(quantized: QuantizedMatrix, dtype: torch.dtype = torch.float32) -> Tensor:
    rows, columns = quantized.shape
    codes = unpack_bits(quantized.packed, quantized.bits, rows * columns).view(rows, columns).float()
    size = columns if quantized.group_size is None else quantized.group_size
    group_of_column = torch.arange(columns, device=quantized.packed.device) // size
    scales = quantized.scales.float()[:, group_of_column]
    minimums = quantized.minimums.float()[:, group_of_column]
    return (minimums + codes * scales).to(dtype)


def quantized_nbytes(shape: tuple[int, int], bits: int, group_size: int | None = None) -> int:
    """Bytes a quantized matrix takes: packed integers plus float16 scale and minimum per group."""
    rows, columns = shape
    groups = 1 if group_size in (None, 0) else -(-columns // min(group_size, columns))
    return -(-rows * columns * bits // 8) + rows * groups * 2 * 2
