"""prune(..., global_ranking=True): channels ranked across all groups by the criterion normalised
per group. Dead channels spread unevenly over the groups are exactly the ones it removes (the
output is unchanged, where per-group pruning at the same amount cuts live channels); the cut
goes to the groups that matter less; target_macs is honoured; bad input is named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from effops.compress import count_macs, prune
from effops.compress._prune_graph import build_groups
from effops.compress._prune_rank import normalised
from effops.compress.study import mini_net
from effops.models import create_model


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)


def _kill_uneven(model: nn.Module, g: torch.Generator):
    """Kill a different fraction (0 to 80%) of each prunable group's channels (BN gamma = beta =
    0 over the group, or zero SE reduce filters); returns (dead, total) channel counts."""
    groups, _, _ = build_groups(model)
    dead_n = total = 0
    with torch.no_grad():
        for gr in groups:
            if gr.fixed or gr.size < 2:
                continue
            total += gr.size
            frac = float(torch.rand((), generator=g)) * 0.8
            dead = torch.randperm(gr.size, generator=g)[: int(gr.size * frac)]
            dead_n += len(dead)
            for s in gr.sites:
                m = model.get_submodule(s.name)
                if gr.has_bn and s.kind == "bn":
                    m.weight[dead] = 0
                    m.bias[dead] = 0
                elif not gr.has_bn and s.kind == "out":
                    m.weight[dead] = 0
                    if m.bias is not None:
                        m.bias[dead] = 0
    return dead_n, total


def test_global_ranking_removes_exactly_the_dead_channels():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    _randomize_bn(model, g)
    dead, total = _kill_uneven(model, g)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    amount = dead / total
    glob, rep = prune(model, amount=amount, example_input=x, global_ranking=True)
    with torch.no_grad():
        out = glob.eval()(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    assert rep.global_ranking and "ranked globally" in str(rep)
    assert sum(gr.before - gr.after for gr in rep.groups) == dead
    ratios = {round(gr.after / gr.before, 2) for gr in rep.groups}
    assert len(ratios) > 5  # not one amount for every group
    # per group at the same amount, live channels go too: the function changes
    local, rep_l = prune(model, amount=amount, example_input=x)
    with torch.no_grad():
        assert float((local.eval()(x) - ref).abs().max() / ref.abs().max()) > 1e-2
    assert not rep_l.global_ranking


def test_cut_goes_to_the_group_whose_channels_matter_less():
    torch.manual_seed(2)
    model = mini_net(1.0, in_chans=3, num_classes=4).eval()
    g = torch.Generator().manual_seed(2)
    _randomize_bn(model, g)
    with torch.no_grad():
        model[3].bn1.weight.fill_(1.0)  # first MBConv's expansion group: every channel alike
        model[3].bn2.weight.fill_(1.0)
        head = model[9].weight  # the 1x1 head's BN: a few strong channels, most weak
        head.uniform_(0.0, 0.1, generator=g)
        head[:8] = 5.0
    x = torch.randn(2, 3, 16, 16)
    p, rep = prune(model, amount=0.3, example_input=x, global_ranking=True)
    widths = {gr.name: (gr.before, gr.after) for gr in rep.groups}
    exp, head_w = widths["3.conv_pw"], widths["8"]
    assert exp == (64, 64)  # uniform: normalised 1.0 each, above the cut
    assert head_w[1] <= head_w[0] - 0.4 * head_w[0]  # the weak head channels go first
    assert p[8].out_channels == head_w[1] and torch.all(p[9].weight[:8] == 5.0)  # the strong ones stay
    removed = sum(b - a for b, a in widths.values())
    assert removed == int(math.floor(sum(b for b, _ in widths.values()) * 0.3 + 0.5))


def test_global_target_macs_round_to_and_min_channels():
    torch.manual_seed(3)
    model = mini_net(1.0, in_chans=3).eval()
    _randomize_bn(model, torch.Generator().manual_seed(3))
    x = torch.randn(1, 3, 16, 16)
    macs = count_macs(model, x)
    p, rep = prune(model, target_macs=0.5, example_input=x, global_ranking=True)
    assert 0.45 * macs < rep.macs_after <= 0.5 * macs and count_macs(p, x) == rep.macs_after
    p, rep = prune(model, amount=0.6, example_input=x, global_ranking=True, round_to=8, min_channels=8)
    assert all(gr.after % 8 == 0 or gr.after == gr.before for gr in rep.groups)
    assert all(gr.after >= min(8, gr.before) for gr in rep.groups)


def test_normalised_scores_and_bad_input():
    assert torch.equal(normalised(torch.tensor([1.0, 3.0], dtype=torch.float64)),
                       torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.equal(normalised(torch.zeros(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
    model = mini_net(1.0, in_chans=3).eval()
    with pytest.raises(TypeError, match="global_ranking must be True or False"):
        prune(model, amount=0.5, example_input=torch.randn(1, 3, 16, 16), global_ranking="yes")


def test_prune_cli_global_ranking(tmp_path, capsys):
    import json

    from effops.cli import main

    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    assert main(["prune", "--model", "efficientnet_b0", "--data", "digits", "--image-size", "16", "--max-samples",
                 "100", "--train-epochs", "1", "--epochs", "1", "--batch-size", "32", "--threads", "1",
                 "--amount", "0.4", "--global-ranking", "--out", str(out)]) == 0
    assert "of all channels (global ranking)" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["global_ranking"] is True and rep["history"][1]["macs"] < rep["history"][0]["macs"]
