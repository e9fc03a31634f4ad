"""The NASNet cell search space: genotypes, encoding, sampling and mutation.

A NASNet cell (Zoph et al., "Learning Transferable Architectures for Scalable Image
Recognition", 2018) has ``num_blocks`` blocks. Block ``i`` picks two inputs among the cell's
hidden states, applies one op to each and adds the results; its output becomes hidden state
``2 + i``. States 0 and 1 are the outputs of the cell two back (c_{k-2}) and of the previous
cell (c_{k-1}); states 2.. are earlier blocks of the same cell. The cell's output is the
channel concatenation of the block outputs that no block uses as input. A network has one
normal cell (stride 1) and one reduction cell (ops on states 0/1 use stride 2), each repeated.

``Genotype`` is the immutable description of both cells; it is printable, hashable and
round-trips through JSON. ``NASNetSpace`` fixes the number of blocks and the op set and
provides the integer encoding used by strategies::

    space = NASNetSpace()
    g = space.sample(rng)                      # rng: numpy Generator or int seed
    codes = space.encode(g)                    # list[int], codes[i] < space.cardinalities()[i]
    assert space.decode(codes) == g
    child = space.mutate(g, rng)               # hidden-state, op or identity mutation
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._checks import _short, parse_json

#: The 13 NASNet ops (paper, section 3), by the names used everywhere in effops.nas.
OPS: Tuple[str, ...] = (
    "identity",
    "conv_1x3_3x1",
    "conv_1x7_7x1",
    "dil_conv_3x3",
    "avg_pool_3x3",
    "max_pool_3x3",
    "max_pool_5x5",
    "max_pool_7x7",
    "conv_1x1",
    "conv_3x3",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "sep_conv_7x7",
)

NUM_INPUT_STATES = 2  # c_{k-2} and c_{k-1}
MAX_BLOCKS = 64  # per cell (the paper uses 5)


class GenotypeError(ValueError):
    """An invalid genotype or genotype JSON; the message says where and why."""


RngLike = Union[np.random.Generator, int]


def as_rng(rng: RngLike, what: str = "rng") -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"{what} must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def _state_name(i: int) -> str:
    return {0: "c_{k-2}", 1: "c_{k-1}"}.get(i, f"b{i - NUM_INPUT_STATES}")


@dataclass(frozen=True)
class Block:
    """One block: ``op_a(state[input_a]) + op_b(state[input_b])``."""

    input_a: int
    op_a: str
    input_b: int
    op_b: str

    def __str__(self) -> str:
        return f"{self.op_a}({self.input_a}) + {self.op_b}({self.input_b})"


@dataclass(frozen=True)
class Cell:
    """The blocks of one cell. ``concat`` lists the hidden states concatenated into the cell's
    output; ``None`` (the search space's rule) means every block output no block uses. An
    explicit ``concat`` exists for published cells that deviate from the rule (NASNet-A)."""

    blocks: Tuple[Block, ...]
    concat: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        # Normalise lists (e.g. from JSON) to tuples so equal cells hash equally.
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.concat is not None:
            object.__setattr__(self, "concat", tuple(int(c) for c in self.concat))

    def used_states(self) -> List[int]:
        return sorted({s for b in self.blocks for s in (b.input_a, b.input_b)})

    def output_states(self) -> Tuple[int, ...]:
        """The hidden states concatenated into the output, in increasing order."""
        if self.concat is not None:
            return self.concat
        used = set(self.used_states())
        return tuple(NUM_INPUT_STATES + i for i in range(len(self.blocks)) if NUM_INPUT_STATES + i not in used)

    def __str__(self) -> str:
        parts = [f"[{NUM_INPUT_STATES + i}] = {b}" for i, b in enumerate(self.blocks)]
        return "; ".join(parts) + f"; concat {list(self.output_states())}"


@dataclass(frozen=True)
class Genotype:
    """A normal and a reduction cell. Constructing one checks it (``GenotypeError``)."""

    normal: Cell
    reduce: Cell

    def __post_init__(self):
        for name in ("normal", "reduce"):
            cell = getattr(self, name)
            if not isinstance(cell, Cell):
                raise GenotypeError(f"genotype: {name} must be a Cell, got {type(cell).__name__}")
            _check_cell(cell, name)

    def __str__(self) -> str:
        return f"normal: {self.normal}\nreduce: {self.reduce}"

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> Dict[str, Any]:
        def cell(c: Cell) -> Dict[str, Any]:
            d: Dict[str, Any] = {"blocks": [[b.input_a, b.op_a, b.input_b, b.op_b] for b in c.blocks]}
            if c.concat is not None:
                d["concat"] = list(c.concat)
            return d

        return {"normal": cell(self.normal), "reduce": cell(self.reduce)}

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> "Genotype":
        if not isinstance(d, dict):
            raise GenotypeError(f"genotype JSON must be an object with keys 'normal' and 'reduce', got {type(d).__name__}")
        missing = [k for k in ("normal", "reduce") if k not in d]
        if missing:
            raise GenotypeError(f"genotype JSON is missing key(s) {missing}; it needs 'normal' and 'reduce'")
        extra = sorted(set(d) - {"normal", "reduce"})
        if extra:
            raise GenotypeError(f"genotype JSON has unknown key(s) {extra}; allowed: 'normal', 'reduce'")
        return cls(normal=_cell_from_dict(d["normal"], "normal"), reduce=_cell_from_dict(d["reduce"], "reduce"))

    @classmethod
    def from_json(cls, text: str) -> "Genotype":
        if not isinstance(text, (str, bytes)):
            raise TypeError(f"Genotype.from_json: text must be str, got {type(text).__name__}")
        return cls.from_dict(parse_json(text, "genotype", GenotypeError))


def _cell_from_dict(d: Any, where: str) -> Cell:
    if not isinstance(d, dict) or "blocks" not in d:
        raise GenotypeError(f"genotype JSON: {where} must be an object with a 'blocks' list")
    extra = sorted(set(d) - {"blocks", "concat"})
    if extra:
        raise GenotypeError(f"genotype JSON: {where} has unknown key(s) {extra}; allowed: 'blocks', 'concat'")
    blocks = d["blocks"]
    if not isinstance(blocks, list):
        raise GenotypeError(f"genotype JSON: {where}.blocks must be a list, got {type(blocks).__name__}")
    if len(blocks) > MAX_BLOCKS:
        raise GenotypeError(f"genotype JSON: {where} has {len(blocks)} blocks; at most {MAX_BLOCKS} are supported")
    out = []
    for i, b in enumerate(blocks):
        if not (isinstance(b, list) and len(b) == 4):
            raise GenotypeError(
                f"genotype JSON: {where} block {i} must be [input_a, op_a, input_b, op_b], got {_short(b)}"
            )
        ia, oa, ib, ob = b
        for name, v in (("input_a", ia), ("input_b", ib)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise GenotypeError(f"genotype JSON: {where} block {i} {name} must be an integer, got {_short(v)}")
        for name, v in (("op_a", oa), ("op_b", ob)):
            if not isinstance(v, str):
                raise GenotypeError(f"genotype JSON: {where} block {i} {name} must be an op name string, got {_short(v)}")
        out.append(Block(ia, oa, ib, ob))
    concat = d.get("concat")
    if concat is not None:
        if not isinstance(concat, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in concat):
            raise GenotypeError(f"genotype JSON: {where}.concat must be a list of integers, got {_short(concat)}")
        concat = tuple(concat)
    return Cell(tuple(out), concat)


def check_op_names(ops: Iterable[str], where: str = "ops") -> None:
    for op in ops:
        if op not in OPS:
            raise GenotypeError(f"{where}: unknown op {op!r}; choose from {list(OPS)}")


def _check_cell(cell: Cell, where: str) -> None:
    if len(cell.blocks) == 0:
        raise GenotypeError(f"genotype: {where} cell has no blocks")
    for i, b in enumerate(cell.blocks):
        if not isinstance(b, Block):
            raise GenotypeError(f"genotype: {where} block {i} must be a Block, got {type(b).__name__}")
        n_states = NUM_INPUT_STATES + i
        for name, v in (("input_a", b.input_a), ("input_b", b.input_b)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise GenotypeError(f"genotype: {where} block {i} {name} must be an integer, got {_short(v)}")
            if not 0 <= v < n_states:
                raise GenotypeError(
                    f"genotype: {where} block {i} {name} = {v} is not an available state; block {i} can "
                    f"use states 0..{n_states - 1} (0, 1: the two previous cells; 2..: earlier blocks)"
                )
        check_op_names([b.op_a, b.op_b], f"genotype: {where} block {i}")
    if cell.concat is not None:
        n = NUM_INPUT_STATES + len(cell.blocks)
        if len(cell.concat) == 0:
            raise GenotypeError(f"genotype: {where}.concat is empty; the cell would have no output")
        bad = [c for c in cell.concat if not 0 <= c < n]
        if bad or len(set(cell.concat)) != len(cell.concat):
            raise GenotypeError(
                f"genotype: {where}.concat {list(cell.concat)} must list distinct states in 0..{n - 1}"
            )


class NASNetSpace:
    """The NASNet cell space: ``num_blocks`` blocks per cell, ops drawn from ``ops``.

    Positions of the encoding, for the normal cell then the reduction cell, block by block:
    ``[input_a, op_a, input_b, op_b]``; an input is a state index (block ``i`` has ``2 + i``
    choices), an op the index into ``self.ops``. Genotypes of the space use the output rule
    (``Cell.concat is None``).
    """

    def __init__(self, num_blocks: int = 5, ops: Optional[Sequence[str]] = None, identity_prob: float = 0.05):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 1 <= num_blocks <= MAX_BLOCKS:
            raise ValueError(f"NASNetSpace: num_blocks must be an integer in [1, {MAX_BLOCKS}], got {_short(num_blocks)}")
        if ops is None:
            ops = OPS
        if isinstance(ops, str) or not all(isinstance(o, str) for o in ops):
            raise TypeError(f"NASNetSpace: ops must be a sequence of op names, got {ops!r}")
        ops = tuple(ops)
        if not ops:
            raise ValueError("NASNetSpace: ops must name at least one op")
        check_op_names(ops, "NASNetSpace: ops")
        if len(set(ops)) != len(ops):
            raise ValueError(f"NASNetSpace: ops lists an op twice: {list(ops)}")
        if not 0.0 <= identity_prob < 1.0:
            raise ValueError(f"NASNetSpace: identity_prob must be in [0, 1), got {identity_prob}")
        self.num_blocks = num_blocks
        self.ops = ops
        self.identity_prob = float(identity_prob)
        self._op_index = {o: i for i, o in enumerate(ops)}

    def __repr__(self) -> str:
        return f"NASNetSpace(num_blocks={self.num_blocks}, ops={list(self.ops)})"

    def to_dict(self) -> Dict[str, Any]:
        return {"num_blocks": self.num_blocks, "ops": list(self.ops), "identity_prob": self.identity_prob}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "NASNetSpace":
        return cls(num_blocks=d["num_blocks"], ops=d["ops"], identity_prob=d.get("identity_prob", 0.05))

    # ---------------------------------------------------------------- encoding
    def cardinalities(self) -> List[int]:
        cell = []
        for i in range(self.num_blocks):
            n_states = NUM_INPUT_STATES + i
            cell += [n_states, len(self.ops), n_states, len(self.ops)]
        return cell + cell

    def size(self) -> int:
        """The number of distinct encodings (an int; it is astronomically large for NASNet)."""
        n = 1
        for c in self.cardinalities():
            n *= c
        return n

    def validate(self, genotype: Genotype) -> Genotype:
        """Raise ``GenotypeError`` unless ``genotype`` is a member of this space."""
        if not isinstance(genotype, Genotype):
            raise TypeError(f"genotype must be a Genotype, got {type(genotype).__name__}")
        for name in ("normal", "reduce"):
            cell = getattr(genotype, name)
            if len(cell.blocks) != self.num_blocks:
                raise GenotypeError(
                    f"genotype: {name} cell has {len(cell.blocks)} blocks; this space has {self.num_blocks}"
                )
            if cell.concat is not None:
                raise GenotypeError(
                    f"genotype: {name} cell has an explicit concat {list(cell.concat)}; the search space "
                    "concatenates the unused blocks (use genotype_without_concat() to drop it)"
                )
            for i, b in enumerate(cell.blocks):
                for op in (b.op_a, b.op_b):
                    if op not in self._op_index:
                        raise GenotypeError(
                            f"genotype: {name} block {i} uses op {op!r}, which this space excludes; "
                            f"its ops are {list(self.ops)}"
                        )
        return genotype

    def contains(self, genotype: Genotype) -> bool:
        try:
            self.validate(genotype)
        except GenotypeError:
            return False
        return True

    def encode(self, genotype: Genotype) -> List[int]:
        self.validate(genotype)
        codes: List[int] = []
        for cell in (genotype.normal, genotype.reduce):
            for b in cell.blocks:
                codes += [b.input_a, self._op_index[b.op_a], b.input_b, self._op_index[b.op_b]]
        return [int(c) for c in codes]

    def decode(self, codes: Sequence[int]) -> Genotype:
        card = self.cardinalities()
        codes = list(codes)
        if len(codes) != len(card):
            raise GenotypeError(f"decode: expected {len(card)} codes for this space, got {len(codes)}")
        for i, (c, n) in enumerate(zip(codes, card)):
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < n:
                raise GenotypeError(f"decode: code {i} = {c!r} is out of range; position {i} has {n} choices")
        cells = []
        half = len(card) // 2
        for part in (codes[:half], codes[half:]):
            blocks = tuple(
                Block(int(part[j]), self.ops[part[j + 1]], int(part[j + 2]), self.ops[part[j + 3]])
                for j in range(0, half, 4)
            )
            cells.append(Cell(blocks))
        return Genotype(normal=cells[0], reduce=cells[1])

    # ---------------------------------------------------------------- sampling
    def sample(self, rng: RngLike) -> Genotype:
        """A uniformly random member of the space."""
        rng = as_rng(rng)
        return self.decode([int(rng.integers(n)) for n in self.cardinalities()])

    def mutate(self, genotype: Genotype, rng: RngLike) -> Genotype:
        """One mutation as in regularized evolution (Real et al. 2019): with probability
        ``identity_prob`` none; otherwise, in the normal or the reduction cell (even odds), a
        hidden-state mutation (one block input moves to another available state) or an op
        mutation (one op becomes another op), even odds. The result differs from the parent
        in at most one position of the encoding and is a member of this space."""
        rng = as_rng(rng)
        codes = self.encode(genotype)
        if rng.random() < self.identity_prob:
            return self.decode(codes)
        card = self.cardinalities()
        half = len(card) // 2
        kind = "state" if rng.random() < 0.5 else "op"
        cell_offset = half * int(rng.integers(2))
        # Positions of the chosen kind that have an alternative value.
        offs = (0, 2) if kind == "state" else (1, 3)
        positions = [cell_offset + 4 * b + o for b in range(self.num_blocks) for o in offs]
        positions = [p for p in positions if card[p] > 1]
        if not positions:  # e.g. op mutation in a one-op space: fall back to a state mutation
            positions = [p for p in range(len(card)) if card[p] > 1]
        p = positions[int(rng.integers(len(positions)))]
        new = int(rng.integers(card[p] - 1))
        codes[p] = new if new < codes[p] else new + 1  # uniform over the other values
        return self.decode(codes)


def genotype_without_concat(genotype: Genotype) -> Genotype:
    """The same blocks with the search space's output rule (drops explicit concats)."""
    return Genotype(Cell(genotype.normal.blocks), Cell(genotype.reduce.blocks))


def _cell(blocks: Sequence[Tuple[int, str, int, str]], concat: Optional[Sequence[int]] = None) -> Cell:
    return Cell(tuple(Block(*b) for b in blocks), None if concat is None else tuple(concat))


#: NASNet-A, the published cells (Zoph et al. 2018, fig. 4; tensorflow/models
#: research/slim/nets/nasnet/nasnet_utils.py). State 0 is c_{k-2}, state 1 is c_{k-1}. The
#: published concatenations deviate from the "unused states" rule: the normal cell also
#: concatenates c_{k-2} (output 6F channels), the reduction cell also its block 1 (4F), so
#: they are explicit here. ``genotype_without_concat(NASNET_A)`` is the in-space version.
NASNET_A = Genotype(
    normal=_cell(
        [
            (1, "sep_conv_5x5", 0, "sep_conv_3x3"),
            (0, "sep_conv_5x5", 0, "sep_conv_3x3"),
            (1, "avg_pool_3x3", 0, "identity"),
            (0, "avg_pool_3x3", 0, "avg_pool_3x3"),
            (1, "sep_conv_3x3", 1, "identity"),
        ],
        concat=(0, 2, 3, 4, 5, 6),
    ),
    reduce=_cell(
        [
            (1, "sep_conv_5x5", 0, "sep_conv_7x7"),
            (1, "max_pool_3x3", 0, "sep_conv_7x7"),
            (1, "avg_pool_3x3", 0, "sep_conv_5x5"),
            (3, "identity", 2, "avg_pool_3x3"),
            (2, "sep_conv_3x3", 1, "max_pool_3x3"),
        ],
        concat=(3, 4, 5, 6),
    ),
)

#: A hand-made baseline for comparisons (chosen before any search was run): a residual chain
#: of 3x3 separable convolutions with a skip from c_{k-2}; the reduction cell starts with a
#: separable conv plus a max pool and ends with a max-pooled skip. Its output is the last block.
HANDMADE_BASELINE = Genotype(
    normal=_cell(
        [
            (1, "sep_conv_3x3", 1, "identity"),
            (2, "sep_conv_3x3", 2, "identity"),
            (3, "sep_conv_3x3", 3, "identity"),
            (4, "sep_conv_3x3", 4, "identity"),
            (5, "sep_conv_3x3", 0, "identity"),
        ]
    ),
    reduce=_cell(
        [
            (1, "sep_conv_3x3", 1, "max_pool_3x3"),
            (2, "sep_conv_3x3", 2, "identity"),
            (3, "sep_conv_3x3", 3, "identity"),
            (4, "sep_conv_3x3", 4, "identity"),
            (5, "sep_conv_3x3", 0, "max_pool_3x3"),
        ]
    ),
)

#: Named genotypes accepted wherever a genotype can be given by name (CLI ``--genotype``).
NAMED_GENOTYPES = {"nasnet-a": NASNET_A, "baseline": HANDMADE_BASELINE}


def load_genotype(arg: str, what: str = "genotype") -> Genotype:
    """A genotype from a name (``nasnet-a``, ``baseline``), a JSON file (a genotype, or an
    ``effops nas export`` .json that holds one) or inline JSON text."""
    import os

    if not isinstance(arg, str) or not arg:
        raise GenotypeError(f"{what}: expected a name {sorted(NAMED_GENOTYPES)}, a JSON file or JSON text, got {arg!r}")
    if arg in NAMED_GENOTYPES:
        return NAMED_GENOTYPES[arg]
    if arg.lstrip().startswith("{"):
        text, where = arg, "JSON text"
    else:
        if not os.path.exists(arg):
            raise GenotypeError(
                f"{what}: {arg!r} is neither a named genotype {sorted(NAMED_GENOTYPES)} nor an existing file"
            )
        try:
            with open(arg) as f:
                text = f.read()
        except OSError as e:
            raise GenotypeError(f"{what}: cannot read {arg!r}: {e}") from None
        where = repr(arg)
    d = parse_json(text, f"{what}: genotype JSON in {where}", GenotypeError)
    if isinstance(d, dict) and "genotype" in d and "normal" not in d:
        d = d["genotype"]  # an export file
    try:
        return Genotype.from_dict(d)
    except GenotypeError as e:
        raise GenotypeError(f"{what}: {where}: {e}") from None
