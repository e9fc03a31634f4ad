"""effops as a drop-in for torchvision.ops.nms / batched_nms: the behaviour torchvision's own
``TestNMS`` (test/test_ops.py) checks, written from that documented behaviour and run with
torchvision's functions patched to effops's, as code written against torchvision would call them.

What torchvision's suite checks on the CPU, and where it is here:
* greedy NMS against a plain reference, 1000 boxes, the last box placed just above the
  threshold's IoU with the first (iou 0.2 / 0.5 / 0.8, seeds 0-9)      -> test_nms_ref
* bad shapes raise RuntimeError                                       -> test_nms_input_errors
* quantized (quint8) boxes and scores give the NMS of their dequantized values -> test_qnms
* batched_nms: per-class loop and coordinate-offset trick agree; batched_nms of an empty
  boxes tensor with the other arguments None is empty                 -> test_batched_nms_implementations
* float16 and float32 keep the same boxes (torchvision checks it on GPUs; here on the CPU)
* the ops pass torch.library.opcheck (torchvision's generated opcheck variants)
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops import boxes as tv_boxes

import effops.ops as E


@pytest.fixture
def ops(monkeypatch):
    """torchvision.ops with nms / batched_nms replaced by effops's (also the module-level name
    torchvision's own batched_nms implementations call)."""
    monkeypatch.setattr(torchvision.ops, "nms", E.nms)
    monkeypatch.setattr(torchvision.ops, "batched_nms", E.batched_nms)
    monkeypatch.setattr(tv_boxes, "nms", E.nms)
    monkeypatch.setattr(tv_boxes, "batched_nms", E.batched_nms)
    return torchvision.ops


def _greedy(boxes, scores, thr):
    """Keep the best box, drop the rest whose IoU with it is > thr, repeat."""
    picked = []
    order = torch.sort(scores, descending=True).indices
    while order.numel():
        cur = order[0]
        picked.append(int(cur))
        rest = order[1:]
        iou = torchvision.ops.box_iou(boxes[rest], boxes[cur][None])[:, 0]
        order = rest[iou <= thr]
    return torch.tensor(picked, dtype=torch.int64)


def _boxes_with_iou(n, thr, gen):
    """n random boxes; the last is the first widened so that their IoU is just above thr."""
    boxes = torch.rand(n, 4, generator=gen) * 100
    boxes[:, 2:] += boxes[:, :2]
    boxes[-1] = boxes[0]
    x0, _, x1, _ = boxes[-1].tolist()
    t = thr + 1e-5
    boxes[-1, 2] += (x1 - x0) * (1 - t) / t
    return boxes, torch.rand(n, generator=gen)


@pytest.mark.parametrize("iou", (0.2, 0.5, 0.8))
@pytest.mark.parametrize("seed", range(10))
def test_nms_ref(ops, iou, seed):
    boxes, scores = _boxes_with_iou(1000, iou, torch.Generator().manual_seed(seed))
    keep = ops.nms(boxes, scores, iou)
    torch.testing.assert_close(keep, _greedy(boxes, scores, iou))
    assert 999 not in keep.tolist() or 0 not in keep.tolist()  # the planted pair never both survive


def test_nms_input_errors(ops):
    cases = [
        (torch.rand(4), torch.rand(3)),  # boxes not 2-d
        (torch.rand(3, 5), torch.rand(3)),  # boxes not [N, 4]
        (torch.rand(3, 4), torch.rand(3, 2)),  # scores not 1-d
        (torch.rand(3, 4), torch.rand(4)),  # counts differ
    ]
    for b, s in cases:
        with pytest.raises(RuntimeError, match="nms: (boxes|scores) must have shape"):
            ops.nms(b, s, 0.5)
        with pytest.raises(ValueError):  # and still a ValueError for effops-style callers
            ops.nms(b, s, 0.5)
    with pytest.raises(RuntimeError, match="same dtype"):  # torchvision: RuntimeError too
        ops.nms(torch.rand(3, 4), torch.rand(3).double(), 0.5)
    with pytest.raises(RuntimeError, match="floating dtype"):
        ops.nms(torch.rand(3, 4).int(), torch.rand(3).int(), 0.5)
    with pytest.raises(TypeError, match="iou_threshold must be a real number"):
        ops.nms(torch.rand(3, 4), torch.rand(3), "0.5")
    with pytest.raises(RuntimeError, match="iou_threshold must be a real number"):
        ops.nms(torch.rand(3, 4), torch.rand(3), None)


def _quantize(t, scale, zero_point, dtype=torch.quint8):
    return torch.quantize_per_tensor(t, scale=scale, zero_point=zero_point, dtype=dtype)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("iou", (0.2, 0.5, 0.8))
@pytest.mark.parametrize("scale, zero_point", ((1, 0), (2, 50), (3, 10)))
def test_qnms(ops, iou, scale, zero_point):
    boxes, scores = _boxes_with_iou(1000, iou, torch.Generator().manual_seed(0))
    scores = scores * 100  # else most scores quantize to 0 or 1
    qboxes = _quantize(boxes, scale, zero_point)
    qscores = _quantize(scores, scale, zero_point)
    keep = ops.nms(qboxes.dequantize(), qscores.dequantize(), iou)
    qkeep = ops.nms(qboxes, qscores, iou)
    torch.testing.assert_close(qkeep, keep)
    # and exactly what torchvision's quantized kernel computes: float32 IoU of the raw integers
    # (its QuantizedCPU kernel; not registered in every torchvision build, so its arithmetic here)
    assert torch.equal(qkeep, _tv_qnms(qboxes, qscores, iou))


def _tv_qnms(qboxes, qscores, iou):
    try:
        return torch.ops.torchvision.nms(qboxes, qscores, iou)
    except NotImplementedError:
        return torch.ops.torchvision.nms(qboxes.int_repr().float(), qscores.int_repr().float(), iou)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_channel:UserWarning")
def test_qnms_signed_and_errors():
    g = torch.Generator().manual_seed(1)
    boxes, scores = _boxes_with_iou(300, 0.5, g)
    qb, qs = _quantize(boxes - 50, 1, 0, torch.qint8), _quantize(scores * 100 - 50, 1, 0, torch.qint8)
    assert torch.equal(E.nms(qb, qs, 0.5), _tv_qnms(qb, qs, 0.5))
    with pytest.raises(RuntimeError, match="same dtype"):  # torchvision: "same type"
        E.nms(qb, scores, 0.5)
    with pytest.raises(RuntimeError, match="same dtype"):
        E.nms(qb, _quantize(scores, 1, 0, torch.quint8), 0.5)
    pc = torch.quantize_per_channel(boxes, torch.ones(4, dtype=torch.double), torch.zeros(4, dtype=torch.long), 1,
                                    torch.quint8)
    with pytest.raises(ValueError, match="per_tensor_affine"):
        E.nms(pc, _quantize(scores, 1, 0), 0.5)


@pytest.mark.parametrize("seed", range(10))
def test_batched_nms_implementations(ops, seed):
    g = torch.Generator().manual_seed(seed)
    n, thr = 1000, 0.9
    boxes = torch.cat((torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g) + 10), dim=1)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, 4, (n,), generator=g)
    vanilla = tv_boxes._batched_nms_vanilla(boxes, scores, idxs, thr)  # calls the patched nms
    trick = tv_boxes._batched_nms_coordinate_trick(boxes, scores, idxs, thr)
    torch.testing.assert_close(vanilla, trick)
    torch.testing.assert_close(ops.batched_nms(boxes, scores, idxs, thr), vanilla)
    empty = torch.empty((0,), dtype=torch.int64)
    torch.testing.assert_close(ops.batched_nms(empty, None, None, None), empty)
    torch.testing.assert_close(ops.batched_nms(torch.empty(0, 4), None, None, None), empty)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):  # only the all-None call is let through
        ops.batched_nms(torch.rand(3, 4), None, None, None)


def test_nms_float16_matches_float32(ops):
    boxes = torch.tensor([[285.3538, 185.5758, 1193.5110, 851.4551],
                          [285.1472, 188.7374, 1192.4984, 851.0669],
                          [279.2440, 197.9812, 1189.4746, 849.2019]])
    scores = torch.tensor([0.6370, 0.7569, 0.3966])
    keep32 = ops.nms(boxes, scores, 0.2)
    torch.testing.assert_close(ops.nms(boxes.half(), scores.half(), 0.2), keep32)
    assert torch.equal(keep32, torch.ops.torchvision.nms(boxes, scores, 0.2))


def test_bool_threshold_as_torchvision(ops):
    boxes, scores = _boxes_with_iou(200, 0.5, torch.Generator().manual_seed(3))
    idxs = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(4))
    for thr in (True, False):
        want = torch.ops.torchvision.nms(boxes, scores, thr)
        assert torch.equal(ops.nms(boxes, scores, thr), want)
        assert torch.equal(ops.batched_nms(boxes, scores, idxs, thr),
                           tv_boxes._batched_nms_coordinate_trick(boxes, scores, idxs, float(thr)))
    assert ops.nms(boxes, scores, True).numel() == 200  # threshold 1.0 never suppresses


def test_opcheck():
    boxes, scores = _boxes_with_iou(100, 0.5, torch.Generator().manual_seed(5))
    idxs = torch.randint(0, 4, (100,), generator=torch.Generator().manual_seed(6))
    torch.library.opcheck(torch.ops.effops.nms.default, (boxes, scores, 0.5))
    torch.library.opcheck(torch.ops.effops.batched_nms.default, (boxes, scores, idxs, 0.5))
