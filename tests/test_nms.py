"""The NMS family: parity with torchvision and with the reference on every backend, edge cases,
mixed precision, registration (opcheck, torch.compile), and bad input."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torchvision

import effops
import effops.ops as E
from conftest import HAS_CUDA, INTERPRET, degenerate_boxes, gen, random_boxes

R = sys.modules["effops.ops.nms"]  # the module (effops.ops.nms is the function)

THRESHOLDS = [-0.5, 0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 1.5]
KINDS = ["uniform", "clustered", "dense", "mixed", "huge_coords", "integer"]


def tv_nms(boxes, scores, thr):
    return torchvision.ops.nms(boxes.cpu(), scores.cpu(), thr)


# ------------------------------------------------------------------------------ nms: CPU vs torchvision
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 65, 123, 1000])
def test_nms_matches_torchvision(n, kind, dtype):
    boxes, scores = random_boxes(n, kind, seed=n, dtype=dtype)
    for thr in THRESHOLDS:
        assert torch.equal(E.nms(boxes, scores, thr), tv_nms(boxes, scores, thr)), (kind, n, thr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_nms_degenerate_matches_torchvision(seed, dtype):
    """Zero-area, inverted, NaN/inf coordinates, duplicate boxes; tied, NaN, inf and -0.0 scores."""
    boxes, scores = degenerate_boxes(300, seed=seed, dtype=dtype)
    for thr in THRESHOLDS + [math.nan]:
        got, want = E.nms(boxes, scores, thr), tv_nms(boxes, scores, thr)
        if math.isnan(thr):  # torchvision keeps everything too, in score order
            assert torch.equal(got, torch.sort(scores, descending=True, stable=True).indices)
        assert torch.equal(got, want), thr


@pytest.mark.parametrize("kind", ["uniform", "clustered"])
def test_nms_large_matches_torchvision(kind):
    boxes, scores = random_boxes(20000 if kind == "uniform" else 10000, kind, seed=3)
    assert torch.equal(E.nms(boxes, scores, 0.5), tv_nms(boxes, scores, 0.5))


def test_nms_tie_order_and_quantized_scores():
    boxes, _ = random_boxes(2000, "uniform", seed=1)
    scores = torch.randint(0, 4, (2000,), generator=gen(2)).float()  # massive ties
    for thr in (0.2, 0.5):
        got = E.nms(boxes, scores, thr)
        assert torch.equal(got, tv_nms(boxes, scores, thr))
        s = scores[got]
        assert bool((s[:-1] >= s[1:]).all())
        same = s[:-1] == s[1:]
        assert bool((got[:-1][same] < got[1:][same]).all()), "ties must come lower index first"


def test_nms_threshold_precision_trap():
    """IoU([0,0,10,1], [0,0,1,1]) is float32(0.1) > 0.1: fp32 suppresses, fp64 keeps both."""
    b = torch.tensor([[0.0, 0, 10, 1], [0, 0, 1, 1]])
    s = torch.tensor([0.9, 0.8])
    assert E.nms(b, s, 0.1).tolist() == [0] == tv_nms(b, s, 0.1).tolist()
    assert E.nms(b.double(), s.double(), 0.1).tolist() == [0, 1] == tv_nms(b.double(), s.double(), 0.1).tolist()


def test_nms_threshold_semantics():
    b = torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 6, 6], [5, 5, 5, 5], [5, 5, 5, 5]])
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert E.nms(b, s, 0.5).tolist() == [0, 1, 2, 3, 4] == tv_nms(b, s, 0.5).tolist()  # IoU 0.5 kept
    assert E.nms(b, s, 0.49).tolist() == [0, 2, 3, 4] == tv_nms(b, s, 0.49).tolist()
    assert E.nms(b, s, 1.0).tolist() == [0, 1, 2, 3, 4]  # threshold 1 never suppresses
    # negative: everything whose IoU with a kept box is not NaN goes; zero-area pairs are NaN
    assert E.nms(b, s, -0.1).tolist() == tv_nms(b, s, -0.1).tolist()
    assert E.nms(b[:0], s[:0], 0.5).tolist() == []
    assert E.nms(b[:1], s[:1], 0.5).tolist() == [0]


def test_nms_nan_scores_sort_first_and_can_suppress():
    b = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    s = torch.tensor([0.9, float("nan"), 0.1])
    assert E.nms(b, s, 0.5).tolist() == [1, 2] == tv_nms(b, s, 0.5).tolist()


# ------------------------------------------------------------------------------ every backend vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["uniform", "dense", "integer"])
@pytest.mark.parametrize("n", [0, 1, 7, 65, 123])
def test_nms_backends_match_reference(backend_device, n, kind, dtype):
    _, dev = backend_device
    boxes, scores = random_boxes(n, kind, seed=7 + n, dtype=dtype, img=200.0)
    for thr in (0.0, 0.3, 0.7, -0.1):
        got = E.nms(boxes.to(dev), scores.to(dev), thr).cpu()
        want = R.nms_reference(boxes, scores, thr)
        assert torch.equal(got, want), thr
        assert torch.equal(want, tv_nms(boxes, scores, thr))


def test_nms_backends_degenerate(backend_device):
    _, dev = backend_device
    boxes, scores = degenerate_boxes(90, seed=11)
    for thr in (0.0, 0.5, -0.2, math.nan):
        assert torch.equal(E.nms(boxes.to(dev), scores.to(dev), thr).cpu(), tv_nms(boxes, scores, thr))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_low_precision_is_fp32_of_the_same_values(backend_device, dtype):
    _, dev = backend_device
    boxes, scores = random_boxes(120, "dense", seed=5, dtype=dtype)
    got = E.nms(boxes.to(dev), scores.to(dev), 0.4).cpu()
    assert torch.equal(got, tv_nms(boxes.float(), scores.float(), 0.4))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what torchvision does under autocast
        assert torch.equal(torchvision.ops.nms(boxes.float(), scores.float(), 0.4), got)


def test_nms_noncontiguous_inputs(backend_device):
    _, dev = backend_device
    boxes, scores = random_boxes(100, "dense", seed=9)
    wide = torch.cat([boxes, boxes], 1).to(dev)[:, ::2]  # strided view of a [N, 8] tensor
    wide[:] = boxes.to(dev)
    s = torch.stack([scores, scores], 1).to(dev)[:, 1]
    assert not wide.is_contiguous() and not s.is_contiguous()
    assert torch.equal(E.nms(wide, s, 0.5).cpu(), tv_nms(boxes, scores, 0.5))


# ------------------------------------------------------------------------------ batched_nms
def per_class_torchvision(boxes, scores, idxs, thr):
    keep = []
    for c in torch.unique(idxs):
        m = torch.nonzero(idxs == c).flatten()
        keep.append(m[tv_nms(boxes[m], scores[m], thr)])
    keep = torch.sort(torch.cat(keep)).values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


@pytest.mark.parametrize("kind", ["uniform", "dense", "huge_coords", "integer"])
@pytest.mark.parametrize("n", [1, 65, 2000])
def test_batched_nms_matches_per_class_loop(n, kind):
    boxes, scores = random_boxes(n, kind, seed=n + 1)
    idxs = torch.randint(-3, 80, (n,), generator=gen(n))
    for thr in (0.0, 0.5, -0.1):
        assert torch.equal(E.batched_nms(boxes, scores, idxs, thr), per_class_torchvision(boxes, scores, idxs, thr))


def test_batched_nms_where_the_offset_trick_fails():
    """torchvision (<= 1000 boxes on CPU) offsets boxes by class; with negative coordinates the
    offset classes overlap and boxes of different classes suppress each other."""
    boxes = torch.tensor([[-10.0, -10, -1, -1], [-10, -10, -1, -1]])
    scores = torch.tensor([0.9, 0.8])
    idxs = torch.tensor([0, 1])
    assert E.batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1]
    assert torchvision.ops.batched_nms(boxes, scores, idxs, 0.5).tolist() == [0]  # the failure
    # very large coordinates: fp32 rounding of the offsets merges classes
    big = torch.tensor([[1e8, 1e8, 1e8 + 64, 1e8 + 64], [1e8, 1e8, 1e8 + 64, 1e8 + 64]])
    assert E.batched_nms(big, scores, idxs, 0.5).tolist() == [0, 1]


def test_batched_nms_same_result_at_every_size():
    boxes, scores = random_boxes(3000, "dense", seed=4)
    idxs = torch.randint(0, 5, (3000,), generator=gen(4))
    full = E.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(full, per_class_torchvision(boxes, scores, idxs, 0.5))
    for n in (999, 1001):  # torchvision switches algorithms at 1000
        assert torch.equal(E.batched_nms(boxes[:n], scores[:n], idxs[:n], 0.5),
                           per_class_torchvision(boxes[:n], scores[:n], idxs[:n], 0.5))


@pytest.mark.parametrize("n", [0, 1, 90])
def test_batched_nms_backends_match_reference(backend_device, n):
    _, dev = backend_device
    boxes, scores = degenerate_boxes(n, seed=n) if n else random_boxes(0)
    idxs = torch.randint(-2, 4, (n,), generator=gen(n))
    for thr in (0.0, 0.5, -0.1):
        got = E.batched_nms(boxes.to(dev), scores.to(dev), idxs.to(dev), thr).cpu()
        assert torch.equal(got, R.batched_nms_reference(boxes, scores, idxs, thr))


def test_batched_nms_integer_dtypes():
    boxes, scores = random_boxes(200, "dense", seed=2)
    idxs = torch.randint(0, 3, (200,), generator=gen(2))
    want = E.batched_nms(boxes, scores, idxs, 0.5)
    for dt in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(E.batched_nms(boxes, scores, idxs.to(dt), 0.5), want)


# ------------------------------------------------------------------------------ multiclass_nms
def mc_data(B, N, C, *, per_class=False, seed=0, dtype=torch.float32):
    g = gen(seed)
    shape = (B, N, C, 2) if per_class else (B, N, 2)
    xy = torch.rand(*shape, generator=g, dtype=torch.float64) * 200
    wh = 5 + torch.rand(*shape, generator=g, dtype=torch.float64) * 50
    boxes = torch.cat([xy, xy + wh], -1).to(dtype)
    scores = torch.rand(B, N, C, generator=g, dtype=torch.float64).to(dtype)
    return boxes, scores


def assert_mc_equal(got, want):
    for name, a, b in zip(got._fields, got, want):
        assert a.dtype == b.dtype, name
        assert torch.equal(a.cpu(), b.cpu()), name


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("top_k", [None, 0, 37, 10000])
def test_multiclass_backends_match_reference(backend_device, per_class, agnostic, top_k):
    _, dev = backend_device
    boxes, scores = mc_data(2, 60, 4, per_class=per_class, seed=1)
    scores[0, :5] = float("nan")  # NaN scores are never candidates
    scores[1, 10:20] = 0.3  # exact ties at the score threshold and among themselves
    for M in (0, 7, 50):
        got = E.multiclass_nms(boxes.to(dev), scores.to(dev), 0.5, 0.3, M, class_agnostic=agnostic, pre_nms_top_k=top_k)
        want = R.multiclass_nms_reference(boxes, scores, 0.5, 0.3, M, agnostic, top_k)
        assert_mc_equal(got, want)


def test_multiclass_against_torchvision_pipeline():
    """effdet-style post-processing written with torchvision: top-k over all (anchor, class)
    pairs, batched_nms per image, first M. Scores are distinct so the unstable sort inside
    torchvision's batched_nms does not matter."""
    B, N, C, K, M = 3, 400, 9, 1000, 100
    boxes, _ = mc_data(B, N, C, seed=5)
    scores = (torch.randperm(B * N * C, generator=gen(5)).float() / (B * N * C)).view(B, N, C)
    got = E.multiclass_nms(boxes, scores, 0.5, 0.05, M, pre_nms_top_k=K)
    for b in range(B):
        flat = scores[b].flatten()
        top = torch.topk(flat, K).indices
        top = top[flat[top] > 0.05]
        anchor, cls = top // C, top % C
        keep = torchvision.ops.batched_nms(boxes[b, anchor], flat[top], cls, 0.5)[:M]
        n = int(got.num_detections[b])
        assert n == keep.numel()
        assert torch.equal(got.indices[b, :n], anchor[keep])
        assert torch.equal(got.classes[b, :n], cls[keep])
        assert torch.equal(got.scores[b, :n], flat[top][keep])
        assert torch.equal(got.boxes[b, :n], boxes[b, anchor[keep]])
        assert bool((got.classes[b, n:] == -1).all()) and bool((got.scores[b, n:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_multiclass_dtypes(backend_device, dtype):
    _, dev = backend_device
    boxes, scores = mc_data(2, 50, 3, seed=3, dtype=dtype)
    got = E.multiclass_nms(boxes.to(dev), scores.to(dev), 0.5, 0.2, 20)
    assert got.boxes.dtype == dtype and got.scores.dtype == dtype
    assert_mc_equal(got, R.multiclass_nms_reference(boxes, scores, 0.5, 0.2, 20))


def test_multiclass_nothing_passes_the_score_threshold():
    boxes, scores = mc_data(2, 10, 3)
    got = E.multiclass_nms(boxes, scores, 0.5, 2.0, 5)
    assert got.num_detections.tolist() == [0, 0]
    assert bool((got.indices == -1).all()) and bool((got.boxes == 0).all())


# ------------------------------------------------------------------------------ soft / matrix NMS
@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("kind", ["uniform", "dense", "integer"])
def test_soft_nms_cpu_matches_reference(method, kind):
    boxes, scores = random_boxes(300, kind, seed=8, img=300.0)
    for thr, sthr in ((0.3, 0.001), (0.5, 0.2), (0.0, 0.0)):
        k1, s1 = E.soft_nms(boxes, scores, thr, 0.5, method, sthr)
        k2, s2 = R.soft_nms_reference(boxes, scores, thr, 0.5, method, sthr)
        assert torch.equal(k1, k2)
        torch.testing.assert_close(s1, s2, rtol=0, atol=0)


def test_soft_nms_backends_match_reference(backend_device):
    _, dev = backend_device
    boxes, scores = degenerate_boxes(80, seed=3)
    scores = torch.nan_to_num(scores, nan=0.25)
    for method in ("linear", "gaussian"):
        k1, s1 = E.soft_nms(boxes.to(dev), scores.to(dev), 0.3, 0.5, method, 0.01)
        k2, s2 = R.soft_nms_reference(boxes, scores, 0.3, 0.5, method, 0.01)
        assert torch.equal(k1.cpu(), k2)
        torch.testing.assert_close(s1.cpu(), s2, rtol=1e-6, atol=1e-7)


def test_soft_nms_semantics():
    b = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]])
    s = torch.tensor([0.9, 0.8, 0.7])
    keep, sc = E.soft_nms(b, s, 0.3, 0.5, "linear", 0.0)
    assert keep.tolist() == [0, 2, 1]  # box 1 (IoU 0.5) decayed to 0.4
    torch.testing.assert_close(sc, torch.tensor([0.9, 0.7, 0.4]))
    keep, sc = E.soft_nms(b, s, 0.3, 0.5, "gaussian", 0.0)
    torch.testing.assert_close(sc[2], torch.tensor(0.8 * math.exp(-0.25 / 0.5)))
    keep, _ = E.soft_nms(b, s, 0.3, 0.5, "linear", 0.5)  # 0.4 < 0.5: dropped
    assert keep.tolist() == [0, 2]


@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
@pytest.mark.parametrize("with_idxs", [False, True])
def test_matrix_nms_backends_match_reference(backend_device, kernel, with_idxs):
    _, dev = backend_device
    boxes, scores = random_boxes(150, "dense", seed=6)
    boxes[:5] = boxes[5]  # exact duplicates: cmax = 1 (linear denominator 0)
    idxs = torch.randint(0, 3, (150,), generator=gen(6)) if with_idxs else None
    got = torch.ops.effops.matrix_nms_decay(boxes.to(dev), scores.to(dev), None if idxs is None else idxs.to(dev),
                                            R._MATRIX_KERNELS[kernel], 2.0).cpu()
    want = R.matrix_nms_decay_reference(boxes, scores, idxs, kernel, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    keep, sc = E.matrix_nms(boxes.to(dev), scores.to(dev), None if idxs is None else idxs.to(dev), kernel, 2.0, 0.1)
    assert bool((sc.cpu() >= 0.1).all()) and bool((sc[:-1] >= sc[1:]).all())


def test_matrix_nms_semantics():
    """Two identical boxes and a third overlapping both: the duplicate is decayed by its IoU
    with the top box; the third is compensated for the duplicate's own overlap."""
    b = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]], dtype=torch.float64)
    s = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    d = torch.ops.effops.matrix_nms_decay(b, s, None, 1, 2.0)
    assert d[0] == 0.9 and d[3] == 0.6
    torch.testing.assert_close(d[1], torch.tensor(0.8 * math.exp(-2.0), dtype=torch.float64))
    # box 2: IoU 0.5 with both; cmax of box 1 is 1 -> ratio exp(-2(0.25-1)) > 1; box 0 gives exp(-0.5)
    torch.testing.assert_close(d[2], torch.tensor(0.7 * math.exp(-0.5), dtype=torch.float64))


# ------------------------------------------------------------------------------ registration
def test_opcheck_all_ops():
    boxes, scores = random_boxes(50, "dense", seed=1)
    idxs = torch.randint(0, 3, (50,), generator=gen(1))
    mb, ms = mc_data(2, 20, 3)
    cases = [
        (torch.ops.effops.nms.default, (boxes, scores, 0.5)),
        (torch.ops.effops.batched_nms.default, (boxes, scores, idxs, 0.5)),
        (torch.ops.effops.multiclass_nms.default, (mb, ms, 0.5, 0.2, 10, False, -1)),
        (torch.ops.effops.soft_nms.default, (boxes, scores, 0.3, 0.5, 1, 0.01)),
        (torch.ops.effops.matrix_nms_decay.default, (boxes, scores, idxs, 1, 2.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    boxes, scores = random_boxes(300, "dense", seed=2)
    mb, ms = mc_data(2, 40, 3, seed=2)

    @torch.compile(fullgraph=True, backend="eager")
    def post(b, s, mb, ms):
        keep = E.nms(b, s, 0.5)
        det = E.multiclass_nms(mb, ms, 0.5, 0.2, 15, pre_nms_top_k=50)
        return keep, det.boxes * 2, det.num_detections

    keep, boxes2, num = post(boxes, scores, mb, ms)
    want = E.multiclass_nms(mb, ms, 0.5, 0.2, 15, pre_nms_top_k=50)
    assert torch.equal(keep, tv_nms(boxes, scores, 0.5))
    assert torch.equal(boxes2, want.boxes * 2) and torch.equal(num, want.num_detections)


def test_torch_compile_inductor_multiclass():
    mb, ms = mc_data(2, 30, 3, seed=4)
    f = torch.compile(lambda b, s: E.multiclass_nms(b, s, 0.5, 0.1, 10).scores.sum(1), fullgraph=True)
    torch.testing.assert_close(f(mb, ms), E.multiclass_nms(mb, ms, 0.5, 0.1, 10).scores.sum(1))


@pytest.mark.gpu
def test_multiclass_cuda_graph_capture():
    """No host synchronisation: the whole call can be captured and replayed."""
    mb, ms = mc_data(4, 500, 20, seed=7)
    mb, ms = mb.cuda(), ms.cuda()
    E.multiclass_nms(mb, ms, 0.5, 0.05, 100, pre_nms_top_k=1000)  # warm up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = E.multiclass_nms(mb, ms, 0.5, 0.05, 100, pre_nms_top_k=1000)
    ms.copy_(torch.rand_like(ms))
    g.replay()
    torch.cuda.synchronize()
    assert_mc_equal(out, E.multiclass_nms(mb, ms, 0.5, 0.05, 100, pre_nms_top_k=1000))


def test_info_lists_every_op():
    info = effops.info(print_table=False)
    table = info["backends"]["cpu"]
    for op in ("nms", "batched_nms", "multiclass_nms", "soft_nms", "matrix_nms"):
        assert table[op]["cpu"] is None and table[op]["reference"] is None
    assert "cpu" in info["build"] and info["version"] == effops.__version__


def test_forced_backend_errors():
    boxes, scores = random_boxes(10)
    with effops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cuda"):
            E.nms(boxes, scores, 0.5)
    with effops.use_backend("triton"):
        if not INTERPRET and not HAS_CUDA:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                E.soft_nms(boxes, scores)
    with pytest.raises(ValueError, match="unknown backend"):
        with effops.use_backend("tpu"):
            pass


# ------------------------------------------------------------------------------ bad input
def test_bad_input_nms():
    b, s = random_boxes(10)
    with pytest.raises(ValueError, match=r"nms: boxes must have shape \[\*, 4\]"):
        E.nms(b[:, :3], s, 0.5)
    with pytest.raises(ValueError, match=r"nms: scores must have shape \[10\]"):
        E.nms(b, s[:9], 0.5)
    with pytest.raises(ValueError, match="scores must have shape"):
        E.nms(b, s[:, None], 0.5)
    with pytest.raises(TypeError, match="nms: boxes must have a floating dtype"):
        E.nms(b.long(), s, 0.5)
    with pytest.raises(TypeError, match="same dtype"):
        E.nms(b, s.double(), 0.5)
    with pytest.raises(TypeError, match="boxes must be a torch.Tensor"):
        E.nms(b.tolist(), s, 0.5)
    with pytest.raises(TypeError, match="iou_threshold must be a real number"):
        E.nms(b, s, "0.5")
    with pytest.raises(TypeError, match="iou_threshold must be a real number"):
        E.nms(b, s, torch.tensor(0.5))


def test_bad_input_devices():
    b, s = random_boxes(10)
    with pytest.raises(ValueError, match="one device"):
        E.nms(b, s.to("meta"), 0.5)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="one device"):
            E.nms(b, s.cuda(), 0.5)
    with pytest.raises(ValueError, match="one device"):
        E.batched_nms(b, s, torch.zeros(10, dtype=torch.long, device="meta"), 0.5)


def test_bad_input_batched_and_multiclass():
    b, s = random_boxes(10)
    with pytest.raises(TypeError, match="idxs must have an integer dtype"):
        E.batched_nms(b, s, torch.zeros(10), 0.5)
    with pytest.raises(ValueError, match=r"idxs must have shape \[10\]"):
        E.batched_nms(b, s, torch.zeros(9, dtype=torch.long), 0.5)
    mb, ms = mc_data(2, 5, 3)
    with pytest.raises(ValueError, match="max_output_boxes must be >= 0"):
        E.multiclass_nms(mb, ms, 0.5, 0.1, -1)
    with pytest.raises(TypeError, match="max_output_boxes must be an integer"):
        E.multiclass_nms(mb, ms, 0.5, 0.1, 2.5)
    with pytest.raises(ValueError, match="pre_nms_top_k must be >= 0"):
        E.multiclass_nms(mb, ms, 0.5, 0.1, 5, pre_nms_top_k=-3)
    with pytest.raises(ValueError, match=r"boxes must have shape \[2, 5, 4\]"):
        E.multiclass_nms(mb[:, :4], ms, 0.5, 0.1, 5)
    with pytest.raises(ValueError, match=r"boxes must have shape \[2, 5, 3, 4\]"):
        E.multiclass_nms(torch.zeros(2, 5, 2, 4), ms, 0.5, 0.1, 5)
    with pytest.raises(ValueError, match=r"scores must have shape \[B, N, C\]"):
        E.multiclass_nms(mb, ms[0], 0.5, 0.1, 5)
    with pytest.raises(ValueError, match="at least one class"):
        E.multiclass_nms(mb, ms[..., :0], 0.5, 0.1, 5)
    with pytest.raises(TypeError, match="class_agnostic must be a bool"):
        E.multiclass_nms(mb, ms, 0.5, 0.1, 5, class_agnostic=1)


def test_bad_input_soft_and_matrix():
    b, s = random_boxes(10)
    s_nan = s.clone()
    s_nan[3] = float("nan")
    with pytest.raises(ValueError, match="soft_nms: scores contains NaN"):
        E.soft_nms(b, s_nan)
    with pytest.raises(ValueError, match="matrix_nms: scores contains NaN"):
        E.matrix_nms(b, s_nan)
    with pytest.raises(ValueError, match="method must be one of"):
        E.soft_nms(b, s, method="hard")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        E.soft_nms(b, s, sigma=0.0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        E.matrix_nms(b, s, kernel="box")
    with pytest.raises(ValueError, match="iou_threshold must not be NaN"):
        E.soft_nms(b, s, math.nan)


def test_kernel_level_errors_are_value_errors():
    """The compiled module checks too (defence in depth): a wrong output buffer is an error."""
    from effops import _backend

    b, s = random_boxes(10)
    with pytest.raises(ValueError, match="keep_out must be int64"):  # never a silent copy
        _backend._C.nms(b, s, 0.5, torch.empty(10), 1)
    with pytest.raises(TypeError):  # a strided output is refused by the binding (noconvert)
        _backend._C.nms(b, s, 0.5, torch.empty(20, dtype=torch.int64)[::2], 1)
    with pytest.raises(ValueError, match="keep_out must have shape"):
        _backend._C.nms(b, s, 0.5, torch.empty(9, dtype=torch.int64), 1)


def test_bad_sizes_and_non_finite_sigma():
    """Issue 14: sizes past int64 are named errors; pre_nms_top_k of any size means 'all'
    (clamped, so the kernel's k + slack arithmetic cannot overflow); a non-finite sigma, on
    which the kernel and the reference disagreed (exp(-inf * 0)), is refused."""
    from effops import _backend

    mb, ms = mc_data(2, 30, 3, seed=9)
    want = E.multiclass_nms(mb, ms, 0.5, 0.1, 10)
    for k in (90, 91, 2**31, 2**63 - 1, 2**63, 2**100):
        assert_mc_equal(E.multiclass_nms(mb, ms, 0.5, 0.1, 10, pre_nms_top_k=k), want)
    for m in (2**31, 2**63, 2**64):
        with pytest.raises(ValueError, match="multiclass_nms: max_output_boxes must be <= 2147483647"):
            E.multiclass_nms(mb, ms, 0.5, 0.1, m)
    # the kernel entry point itself, with k = INT64_MAX (no Python clamp in between)
    num = torch.empty(2, dtype=torch.int64)
    ob, os_, oc, oi = torch.empty(2, 10, 4), torch.empty(2, 10), torch.empty(2, 10, dtype=torch.int64), \
        torch.empty(2, 10, dtype=torch.int64)
    _backend._C.multiclass_nms(mb, ms, 0.5, 0.1, 2**63 - 1, False, num, ob, os_, oc, oi, 1)
    assert torch.equal(num, want.num_detections) and torch.equal(oi, want.indices)
    b, s = random_boxes(20, "dense", seed=3)
    for sigma in (math.inf, -math.inf):
        with pytest.raises(ValueError, match="matrix_nms: sigma must be finite"):
            E.matrix_nms(b, s, sigma=sigma)
        with pytest.raises(ValueError, match="soft_nms: sigma must be finite"):
            E.soft_nms(b, s, sigma=sigma)
        with pytest.raises(ValueError, match="matrix_nms: sigma must be finite"):
            _backend._C.matrix_nms(b, s, None, 1, sigma, torch.empty(20), 1)
    with pytest.raises(ValueError, match="iou_threshold = .* out of the float64 range"):
        E.nms(b, s, 10**400)


@pytest.mark.parametrize("n", [1, 7, 300])
def test_no_proper_box_at_all(n):
    """Found by the fuzz suite: with no proper box (all inverted, empty or non-finite) the
    neighbour grid was left without its offset tables and soft/matrix NMS read past them (a
    segfault). Run in a child process so a regression fails this test, not the session."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import math, torch, effops.ops as E
        from effops.ops import nms as _n
        import sys
        R = sys.modules["effops.ops.nms"]
        for box in ([47.0, 9.0, 46.0, 16.0], [1.0, 1.0, 1.0, 5.0], [math.nan, 0, 1, 1], [0, 0, math.inf, 1]):
            b = torch.tensor([box]).repeat({n}, 1)
            s = torch.linspace(0.9, 0.2, {n})
            k, sc = E.soft_nms(b, s)
            k2, sc2 = R.soft_nms_reference(b, s)
            assert torch.equal(k, k2) and torch.equal(sc, sc2), box
            k, sc = E.matrix_nms(b, s, torch.zeros({n}, dtype=torch.long))
            assert torch.equal(sc, s[k]), box  # nothing overlaps: no decay
            assert torch.equal(E.nms(b, s, 0.5), R.nms_reference(b, s, 0.5))
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
