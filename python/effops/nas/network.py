"""Networks built from a genotype: ``build(genotype, C, N, num_classes, stem=...)``.

Layout (NASNet, Zoph et al. 2018, fig. 2): stem, then N normal cells, a reduction cell
(filters x2), N normal cells, a reduction cell (filters x2), N normal cells, then ReLU,
global average pool, dropout and a linear classifier. ``C`` is the number of filters F of
the first normal cells; a cell's output has ``len(concat) * F`` channels.

Stems: ``"cifar"`` is a 3x3 conv with ``stem_multiplier * C`` filters (NASNet's CIFAR stem);
``"imagenet"`` is NASNet's ImageNet stem: a 3x3 stride-2 conv with ``stem_channels`` (32)
filters, then two reduction cells with C/4 and C/2 filters.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .ops import Head, make_op, make_preprocess, make_stem
from .space import NUM_INPUT_STATES, Cell, Genotype


class CellModule(nn.Module):
    """One cell. Inputs: s0 = c_{k-2}, s1 = c_{k-1} (s0 at twice the resolution of s1 when
    ``reduction_prev``). Output: the concatenated states, ``self.multiplier * C`` channels."""

    def __init__(self, cell: Cell, c_pp: int, c_p: int, C: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        # A cell input no block uses (and the output does not concatenate) is not computed.
        needed = set(cell.used_states()) | set(cell.output_states())
        self.pre0 = make_preprocess(c_pp, C, reduce=reduction_prev) if 0 in needed else None
        self.pre1 = make_preprocess(c_p, C, reduce=False) if 1 in needed else None
        self.inputs = [(b.input_a, b.input_b) for b in cell.blocks]
        ops = []
        for b in cell.blocks:
            for state, op in ((b.input_a, b.op_a), (b.input_b, b.op_b)):
                stride = 2 if reduction and state < NUM_INPUT_STATES else 1
                ops.append(make_op(op, C, stride))
        self.ops = nn.ModuleList(ops)
        self.concat = list(cell.output_states())
        # An explicit concat may name a cell input; in a reduction cell it must be reduced too.
        self.concat_reduce = nn.ModuleDict(
            {str(s): make_preprocess(C, C, reduce=True) for s in self.concat if reduction and s < NUM_INPUT_STATES}
        )
        self.multiplier = len(self.concat)
        self.C = C

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0) if self.pre0 is not None else None, self.pre1(s1) if self.pre1 is not None else None]
        for i, (a, b) in enumerate(self.inputs):
            states.append(self.ops[2 * i](states[a]) + self.ops[2 * i + 1](states[b]))
        outs = []
        for s in self.concat:
            h = states[s]
            if str(s) in self.concat_reduce:
                h = self.concat_reduce[str(s)](h)
            outs.append(h)
        return torch.cat(outs, dim=1)


def _check_build_args(genotype, C, N, num_classes, stem, in_channels, stem_multiplier, stem_channels, dropout):
    if not isinstance(genotype, Genotype):
        raise TypeError(f"build: genotype must be a Genotype, got {type(genotype).__name__}")
    for name, v, lo in (("C", C, 2), ("N", N, 1), ("num_classes", num_classes, 1), ("in_channels", in_channels, 1),
                        ("stem_multiplier", stem_multiplier, 1), ("stem_channels", stem_channels, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"build: {name} must be an integer >= {lo}, got {v!r}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"build: stem must be 'cifar' or 'imagenet', got {stem!r}")
    if stem == "imagenet" and C % 4:
        raise ValueError(f"build: C must be a multiple of 4 with the imagenet stem (cells with C/4, C/2), got {C}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"build: dropout must be in [0, 1), got {dropout}")


class NASNetwork(nn.Module):
    """A stack of cells built from a genotype (see the module docstring)."""

    def __init__(
        self,
        genotype: Genotype,
        C: int,
        N: int,
        num_classes: int,
        stem: str = "cifar",
        in_channels: int = 3,
        stem_multiplier: int = 3,
        stem_channels: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_build_args(genotype, C, N, num_classes, stem, in_channels, stem_multiplier, stem_channels, dropout)
        self.genotype = genotype
        cells: List[CellModule] = []
        if stem == "cifar":
            c_stem = stem_multiplier * C
            self.stem = make_stem("cifar", in_channels, c_stem)
            c_pp, c_p, reduction_prev = c_stem, c_stem, False
        else:  # "imagenet" (checked above)
            self.stem = make_stem("imagenet", in_channels, stem_channels)
            c_pp, c_p, reduction_prev = stem_channels, stem_channels, False
            for div in (4, 2):  # two reduction cells with C/4 and C/2 filters
                cell = CellModule(genotype.reduce, c_pp, c_p, C // div, True, reduction_prev)
                cells.append(cell)
                c_pp, c_p, reduction_prev = c_p, cell.multiplier * (C // div), True
        self.num_stem_cells = len(cells)
        c = C
        for stage in range(3):
            if stage > 0:
                c *= 2
                cell = CellModule(genotype.reduce, c_pp, c_p, c, True, reduction_prev)
                cells.append(cell)
                c_pp, c_p, reduction_prev = c_p, cell.multiplier * c, True
            for _ in range(N):
                cell = CellModule(genotype.normal, c_pp, c_p, c, False, reduction_prev)
                cells.append(cell)
                c_pp, c_p, reduction_prev = c_p, cell.multiplier * c, False
        self.cells = nn.ModuleList(cells)
        self.head = Head(c_p, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The first cell sees the stem output as both of its inputs (as in NASNet).
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.head(s1)


def build(genotype: Genotype, C: int, N: int, num_classes: int, **kwargs) -> NASNetwork:
    """The network of ``genotype``: N normal cells per stage, C filters in the first stage;
    keyword arguments as ``NASNetwork`` (stem, in_channels, stem_multiplier, stem_channels,
    dropout).

    ``build(NASNET_A, 44, 4, 1000, stem="imagenet")`` is NASNet-A (mobile, 4 @ 1056).
    """
    return NASNetwork(genotype, C, N, num_classes, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

