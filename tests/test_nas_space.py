"""effops.nas search space, genotypes, ops and network builder."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from effops.nas import (
    HANDMADE_BASELINE,
    NASNET_A,
    OPS,
    Block,
    Cell,
    Genotype,
    GenotypeError,
    NASNetSpace,
    build,
    count_params,
    genotype_without_concat,
)
from effops.nas import ops as nas_ops
from effops.nas.space import load_genotype


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_thirteen_nasnet_ops():
    assert len(OPS) == 13 and len(set(OPS)) == 13
    for name in ("identity", "conv_1x3_3x1", "conv_1x7_7x1", "dil_conv_3x3", "avg_pool_3x3", "max_pool_3x3",
                 "max_pool_5x5", "max_pool_7x7", "conv_1x1", "conv_3x3", "sep_conv_3x3", "sep_conv_5x5",
                 "sep_conv_7x7"):
        assert name in OPS


def test_cardinalities():
    space = NASNetSpace()
    card = space.cardinalities()
    assert len(card) == 2 * 5 * 4
    assert card[:8] == [2, 13, 2, 13, 3, 13, 3, 13]
    assert card[16:20] == [6, 13, 6, 13] and card[20:] == card[:20]
    small = NASNetSpace(num_blocks=2, ops=["identity", "sep_conv_3x3"])
    assert small.cardinalities() == [2, 2, 2, 2, 3, 2, 3, 2] * 2
    assert small.size() == (2 * 2 * 2 * 2 * 3 * 2 * 3 * 2) ** 2


def test_encode_decode_round_trip():
    space = NASNetSpace()
    rng = np.random.default_rng(0)
    card = space.cardinalities()
    for _ in range(200):
        g = space.sample(rng)
        codes = space.encode(g)
        assert all(0 <= c < n for c, n in zip(codes, card))
        assert space.decode(codes) == g
        codes = [int(rng.integers(n)) for n in card]
        assert space.encode(space.decode(codes)) == codes


def test_decode_rejects_bad_codes():
    space = NASNetSpace()
    codes = space.encode(space.sample(1))
    with pytest.raises(GenotypeError, match="expected 40 codes"):
        space.decode(codes[:-1])
    bad = list(codes)
    bad[0] = 2  # block 0 can only use states 0 and 1
    with pytest.raises(GenotypeError, match="code 0 = 2 is out of range; position 0 has 2 choices"):
        space.decode(bad)
    bad = list(codes)
    bad[1] = 13
    with pytest.raises(GenotypeError, match="code 1"):
        space.decode(bad)


def test_genotype_printable_hashable_json():
    space = NASNetSpace()
    gs = [space.sample(s) for s in range(30)]
    for g in gs:
        text = str(g)
        assert text.startswith("normal: [2] = ") and "\nreduce: " in text and "concat" in text
        assert Genotype.from_json(g.to_json()) == g
        assert hash(Genotype.from_json(g.to_json())) == hash(g)
    assert len(set(gs + gs)) == len(set(gs))
    assert Genotype.from_json(NASNET_A.to_json(indent=2)) == NASNET_A
    assert json.loads(NASNET_A.to_json())["normal"]["concat"] == [0, 2, 3, 4, 5, 6]
    assert "sep_conv_5x5(1) + sep_conv_3x3(0)" in str(NASNET_A)


def test_output_rule_concatenates_unused_blocks():
    g = HANDMADE_BASELINE
    assert g.normal.output_states() == (6,)  # a chain: only the last block is unused
    cell = Cell((Block(0, "identity", 1, "identity"), Block(0, "conv_1x1", 1, "conv_1x1"),
                 Block(2, "identity", 1, "identity")))
    assert cell.output_states() == (3, 4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "genotype: invalid JSON"),
        ("[1, 2]", "must be an object"),
        ('{"normal": {"blocks": []}}', r"missing key\(s\) \['reduce'\]"),
        ('{"normal": {"blocks": [[0, "identity", 1, "identity"]]}, "reduce": {"blocks": [[0, "bogus_op", 1, "identity"]]}}',
         "reduce block 0: unknown op 'bogus_op'"),
        ('{"normal": {"blocks": [[0, "identity", 2, "identity"]]}, "reduce": {"blocks": [[0, "identity", 1, "identity"]]}}',
         "normal block 0 input_b = 2 is not an available state"),
        ('{"normal": {"blocks": [[0, "identity", 1]]}, "reduce": {"blocks": []}}', r"must be \[input_a, op_a, input_b, op_b\]"),
        ('{"normal": {"blocks": [["0", "identity", 1, "identity"]]}, "reduce": {"blocks": [[0, "identity", 1, "identity"]]}}',
         "input_a must be an integer"),
        ('{"normal": {"blocks": []}, "reduce": {"blocks": [[0, "identity", 1, "identity"]]}}', "normal cell has no blocks"),
        ('{"normal": {"blocks": [[0, "identity", 1, "identity"]], "concat": [5]}, "reduce": {"blocks": [[0, "identity", 1, "identity"]]}}',
         r"normal.concat \[5\] must list distinct states in 0..2"),
        ('{"normal": {"blocks": [[0, "identity", 1, "identity"]]}, "reduce": {"blocks": [[0, "identity", 1, "identity"]]}, "x": 1}',
         r"unknown key\(s\) \['x'\]"),
    ],
)
def test_invalid_genotype_json_gives_clear_errors(text, message):
    with pytest.raises(GenotypeError, match=message):
        Genotype.from_json(text)


def test_invalid_genotypes_cannot_be_constructed():
    with pytest.raises(GenotypeError, match="unknown op 'conv_9x9'"):
        Genotype(Cell((Block(0, "identity", 1, "identity"),)), Cell((Block(0, "conv_9x9", 1, "identity"),)))
    with pytest.raises(GenotypeError, match="block 1 input_a = 3"):
        Genotype(Cell((Block(0, "identity", 1, "identity"), Block(3, "identity", 0, "identity"))),
                 Cell((Block(0, "identity", 1, "identity"),)))


def test_space_validate():
    space = NASNetSpace()
    with pytest.raises(GenotypeError, match="explicit concat"):
        space.validate(NASNET_A)
    assert space.contains(genotype_without_concat(NASNET_A))
    assert space.contains(HANDMADE_BASELINE)
    small = NASNetSpace(ops=["identity", "sep_conv_3x3", "max_pool_3x3"])
    with pytest.raises(GenotypeError, match="uses op 'sep_conv_5x5', which this space excludes"):
        small.validate(genotype_without_concat(NASNET_A))
    with pytest.raises(GenotypeError, match="has 5 blocks; this space has 3"):
        NASNetSpace(num_blocks=3).validate(HANDMADE_BASELINE)
    with pytest.raises(TypeError, match="genotype must be a Genotype"):
        space.validate("normal: ...")


def test_space_arguments_checked():
    with pytest.raises(GenotypeError, match="NASNetSpace: ops: unknown op 'sep_conv_9x9'"):
        NASNetSpace(ops=["identity", "sep_conv_9x9"])
    with pytest.raises(ValueError, match="num_blocks must be an integer in \\[1, 64\\]"):
        NASNetSpace(num_blocks=0)
    with pytest.raises(ValueError, match="lists an op twice"):
        NASNetSpace(ops=["identity", "identity"])
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator or an int seed"):
        NASNetSpace().sample(0.5)


def test_mutation_stays_in_space_and_changes_one_position():
    space = NASNetSpace(identity_prob=0.0)
    rng = np.random.default_rng(1)
    card = space.cardinalities()
    changed_kinds = set()
    parent = space.sample(rng)
    for _ in range(500):
        child = space.mutate(parent, rng)
        assert space.contains(child)
        a, b = space.encode(parent), space.encode(child)
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert len(diff) == 1
        i = diff[0]
        assert 0 <= b[i] < card[i]
        changed_kinds.add(("op" if i % 2 else "state", "normal" if i < len(card) // 2 else "reduce"))
        parent = child
    assert changed_kinds == {("op", "normal"), ("op", "reduce"), ("state", "normal"), ("state", "reduce")}


def test_identity_mutation_and_determinism():
    space = NASNetSpace(identity_prob=0.5)
    g = space.sample(3)
    same = sum(space.mutate(g, np.random.default_rng(s)) == g for s in range(400))
    assert 140 < same < 260  # ~50% identity (a real mutation never returns the parent)
    assert space.mutate(g, 7) == space.mutate(g, 7)
    one_op = NASNetSpace(ops=["conv_3x3"], identity_prob=0.0)
    g1 = one_op.sample(0)
    for s in range(20):  # op mutation impossible: falls back to a state mutation
        child = one_op.mutate(g1, s)
        assert one_op.contains(child) and child != g1


def test_load_genotype(tmp_path):
    assert load_genotype("nasnet-a") is NASNET_A
    p = tmp_path / "g.json"
    p.write_text(HANDMADE_BASELINE.to_json())
    assert load_genotype(str(p)) == HANDMADE_BASELINE
    p.write_text(json.dumps({"format": "x", "genotype": HANDMADE_BASELINE.to_dict()}))
    assert load_genotype(str(p)) == HANDMADE_BASELINE
    p.write_text("{oops")
    with pytest.raises(GenotypeError, match="--genotype: genotype JSON in '.*g.json': invalid JSON"):
        load_genotype(str(p), "--genotype")
    with pytest.raises(GenotypeError, match="neither a named genotype"):
        load_genotype(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_op_shapes(name, stride, size):
    torch.manual_seed(0)
    op = nas_ops.make_op(name, 6, stride).eval()
    x = torch.randn(2, 6, size, size)
    y = op(x)
    out = size if stride == 1 else (size + 1) // 2
    assert y.shape == (2, 6, out, out)
    if name == "identity" and stride == 1:
        assert y is x
    else:
        spec = op.latency_spec
        assert spec == ("op", name, 6, stride)
        twin = nas_ops.module_from_spec(spec)
        assert type(twin) is type(op) and count_params(twin) == count_params(op)


def test_make_op_rejects_unknown():
    with pytest.raises(GenotypeError, match="unknown op 'sep_conv_4x4'"):
        nas_ops.make_op("sep_conv_4x4", 4, 1)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        nas_ops.make_op("conv_3x3", 4, 3)


def test_sep_conv_is_two_fused_relu_dw_pw_bn_units():
    from effops.nn import DWSeparableConv2d

    op = nas_ops.make_op("sep_conv_5x5", 8, 2)
    units = list(op.children())
    assert len(units) == 2 and all(isinstance(u, DWSeparableConv2d) for u in units)
    first = units[0]
    assert first.preact and first.act_name == "relu" and first.bn_dw is None and first.bn_pw is not None
    assert first.conv_dw.groups == 8 and first.conv_dw.kernel_size == (5, 5) and first.conv_dw.stride == (2, 2)
    assert units[1].conv_dw.stride == (1, 1)
    # params: 2 x (depthwise 8*25 + pointwise 8*8 + BN 2*8)
    assert count_params(op) == 2 * (8 * 25 + 64 + 16)


@pytest.mark.parametrize("train", [False, True])
def test_separable_unit_equals_local_composition(train):
    """The fused unit computes ReLU -> dw -> pw -> BN exactly as the plain-PyTorch composition
    (same weights), in train mode (batch statistics) and in eval mode (folded BN)."""
    torch.manual_seed(0)
    for c_in, c_out, k, s, d in [(4, 4, 3, 1, 1), (5, 7, 7, 2, 1), (6, 6, 3, 1, 2)]:
        unit = nas_ops._separable(c_in, c_out, k, s, d)
        local = nas_ops._LocalSeparable(c_in, c_out, k, s, d)
        assert count_params(unit) == count_params(local)
        _, dw, pw, bn = local.children()
        dw.weight.data.copy_(unit.conv_dw.weight)
        pw.weight.data.copy_(unit.conv_pw.weight)
        bn.running_var.uniform_(0.5, 2.0)
        unit.bn_pw.running_var.copy_(bn.running_var)
        unit.train(train), local.train(train)
        x = torch.randn(2, c_in, 11, 11, requires_grad=True)
        a, b = unit(x), local(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        (ga,) = torch.autograd.grad(a.square().sum(), x)
        (gb,) = torch.autograd.grad(b.square().sum(), x)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_factorized_reduce_odd_channels_and_sizes():
    fr = nas_ops.FactorizedReduce(5, 11)
    assert fr(torch.randn(2, 5, 9, 9)).shape == (2, 11, 5, 5)


# ------------------------------------------------------------------------------ networks
def test_build_random_genotypes_forward_and_backward():
    space = NASNetSpace()
    for seed in range(4):
        g = space.sample(seed)
        net = build(g, C=4, N=1, num_classes=10, in_channels=1)
        x = torch.randn(2, 1, 16, 16)
        out = net(x)
        assert out.shape == (2, 10)
        out.sum().backward()
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_build_cell_widths_and_reductions():
    net = build(HANDMADE_BASELINE, C=4, N=2, num_classes=3, in_channels=2)
    kinds = [c.reduction for c in net.cells]
    assert kinds == [False, False, True, False, False, True, False, False]
    shapes = []
    for cell in net.cells:
        cell.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[1:])))
    net(torch.randn(2, 2, 15, 15))
    # Baseline: one concatenated block -> C channels; reductions double C and halve H, W (ceil).
    assert shapes == [(4, 15, 15)] * 2 + [(8, 8, 8)] * 3 + [(16, 4, 4)] * 3


def test_nasnet_a_mobile_parameter_count():
    net = build(NASNET_A, C=44, N=4, num_classes=1000, stem="imagenet")
    n = count_params(net)
    print(f"\nNASNet-A mobile (N=4, 44 filters, 1000 classes): {n:,} parameters; published: 5.3M")
    assert n == 5_287_076  # regression value of this implementation
    assert abs(n - 5.3e6) / 5.3e6 < 0.01
    # 4 @ 1056: the last normal cell outputs 6 x 176 channels.
    assert net.head.fc.in_features == 1056
    assert len(net.cells) == 2 + 12 + 2
    from effops.nas import count_flops

    macs = count_flops(net, (1, 3, 224, 224)) / 2
    print(f"multiply-adds at 224x224: {macs / 1e6:.1f}M; published: 564M")
    assert abs(macs - 564e6) / 564e6 < 0.02


def test_build_argument_errors():
    with pytest.raises(ValueError, match="build: C must be an integer >= 2"):
        build(HANDMADE_BASELINE, C=0, N=1, num_classes=10)
    with pytest.raises(ValueError, match="build: N must be an integer >= 1"):
        build(HANDMADE_BASELINE, C=8, N=0, num_classes=10)
    with pytest.raises(ValueError, match="stem must be 'cifar' or 'imagenet'"):
        build(HANDMADE_BASELINE, C=8, N=1, num_classes=10, stem="resnet")
    with pytest.raises(ValueError, match="multiple of 4"):
        build(HANDMADE_BASELINE, C=10, N=1, num_classes=10, stem="imagenet")
    with pytest.raises(TypeError, match="genotype must be a Genotype"):
        build(HANDMADE_BASELINE.to_dict(), C=8, N=1, num_classes=10)
