"""Whole-network benchmark (``effops bench models``): timm / effdet models as users have them,
run every way a user could run them on this machine, timed side by side in one interleaved run
after their outputs are checked against eager PyTorch.

Variants (labels as they appear in the rows):
  eager (NCHW)            the original model, NCHW input (the reference every output is checked against)
  eager (channels_last)   the original model and input in channels_last
  torch.compile           torch.compile of the original (channels_last, dynamic=False)
  effops                  effops.nn.convert() of the original, channels_last (the ratio base)
  torch.compile (effops)  torch.compile of the converted model
  onnxruntime             the original exported to ONNX, CPUExecutionProvider, ORT_ENABLE_ALL,
                          intra_op threads = the thread count (fp32 only: its CPU provider has no
                          bf16 convolutions)
  openvino                the same ONNX file on OpenVINO's CPU plugin, same threads, inference
                          precision = the row's dtype
  effops.models           effops's own model of the same name with the original's weights, where
                          effops.models provides it
bf16 rows run the torch variants under torch.autocast('cpu', bfloat16) and are checked against
the float32 reference with a bf16 tolerance. ONNX Runtime and OpenVINO are optional (the bench
extra); a variant that is not installed, cannot be built or disagrees is not timed and says why.

Each case also carries two floors, as rows of their own (ratio < 1: the floor is that fraction of
effops' time): the compute floor (the model's multiply-adds, counted by torch.utils.flop_counter,
at this machine's measured matmul peak) and the traffic floor (the compulsory activation bytes at
the measured copy bandwidth: the input, the weights once, and every tensor that crosses a block
boundary written once and read once; inside a block everything could stay in cache).

``--train``: one training step (forward + loss + backward + SGD step, batch 8) per model against
eager and torch.compile. ``--cold``: time to first result (model build + conversion / compilation /
export + first call) as rows of op 'model cold start', with a fresh inductor cache so that
torch.compile pays its whole compilation."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .harness import EFFOPS, Case, copy_bandwidth, fma_peak, run_cases
from .models_report import format_model_case

CL = torch.channels_last
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-3, "bf16": 8e-2}  # max |y - ref| / max |ref| against the fp32 eager output
TRAIN_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}  # relative error of the loss after the same steps


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # 'timm' (classifier) or 'effdet' (detector, post-processing included)
    size: int

    @property
    def title(self) -> str:
        return f"{self.family} {self.name} {self.size}x{self.size}"


MODELS: Dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("efficientnet_b0", "timm", 224),
    ModelSpec("tf_efficientnet_b3", "timm", 300),
    ModelSpec("mobilenetv2_100", "timm", 224),
    ModelSpec("mobilenetv3_large_100", "timm", 224),
    ModelSpec("tf_efficientdet_d0", "effdet", 512),
)}
QUICK = ModelSpec("mobilenetv2_100", "timm", 128)  # --quick: one small model, batch 1, 1 thread


def _randomize_bn(m: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics (fresh ones are 0 / 1, which would hide folding errors)."""
    g = torch.Generator().manual_seed(seed)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.copy_((torch.rand(b.num_features, generator=g) - 0.5) * 0.2)
            b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
    return m


class Detector(nn.Module):
    """effdet's DetBenchPredict (the network, then its post-processing: top-k, box decoding,
    batched NMS) that also returns the raw head outputs, flattened, so that the network itself
    can be compared exactly (detections near the top-k cut swap under rounding)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        from effdet import DetBenchPredict

        self.bench = DetBenchPredict(net)

    def forward(self, x):
        cls_out, box_out = self.bench.model(x)
        return self.postprocess(x.shape[0], cls_out, box_out)

    def postprocess(self, n: int, cls_out, box_out):
        """(detections [n, max_det, 6], raw head outputs [n, *]) from the per-level outputs."""
        from effdet.bench import _batch_detection, _post_process

        b = self.bench
        raw = torch.cat([t.flatten(1) for t in list(cls_out) + list(box_out)], 1)
        c, bx, idx, classes = _post_process(cls_out, box_out, num_levels=b.num_levels, num_classes=b.num_classes,
                                            max_detection_points=b.max_detection_points)
        det = _batch_detection(n, c, bx, b.anchors.boxes, idx, classes, None, None,
                               max_det_per_image=b.max_det_per_image, soft_nms=b.soft_nms)
        return det, raw


def build_original(spec: ModelSpec, train: bool = False) -> nn.Module:
    """The model as a user has it (random weights, seeded: every call builds the same model).
    Dropout and drop-path are off, so that training steps of the variants stay comparable."""
    torch.manual_seed(0)
    if spec.family == "timm":
        import timm

        m = timm.create_model(spec.name, pretrained=False, drop_rate=0.0, drop_path_rate=0.0)
    elif spec.family == "effdet":
        from effdet import create_model_from_config, get_efficientdet_config

        config = get_efficientdet_config(spec.name)
        config.backbone_args = dict(config.backbone_args or {}, drop_path_rate=0.0)
        config.image_size = (spec.size, spec.size)
        net = create_model_from_config(config, pretrained=False, pretrained_backbone=False)
        m = net if train else Detector(net)
    else:
        raise ValueError(f"model family must be 'timm' or 'effdet', got {spec.family!r}")
    _randomize_bn(m, 1)
    return m.train() if train else m.eval()


# ----------------------------------------------------------------------------- what the floors need
def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward call (torch.utils.flop_counter counts 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2


_BLOCKS = {"DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual", "ConvBnAct", "Fnode", "ClassNet", "BoxNet",
           "CondConvResidual", "UniversalInvertedResidual"}


def compulsory_bytes(model: nn.Module, x: torch.Tensor, itemsize: int) -> int:
    """Bytes that must move per forward call with everything inside a block fused: the input
    read, the weights read once, each block's output (and the stem's, the head's) written once
    and read once. Elements counted at ``itemsize`` bytes (the run's dtype)."""
    total = [x.numel() * itemsize + sum(p.numel() for p in model.parameters()) * itemsize]

    def tensors(o):
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, (list, tuple)):
            for v in o:
                yield from tensors(v)

    def hook(_m, _i, out):
        total[0] += 2 * itemsize * sum(t.numel() for t in tensors(out))

    handles = []
    for name, m in model.named_modules():
        if type(m).__name__ in _BLOCKS or name.split(".")[-1] in ("bn1", "bn2", "norm_head") and "." not in name:
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


# ----------------------------------------------------------------------------- variants
@dataclass
class Variant:
    fn: Callable[[], object]
    first_s: float  # build + first call (time to first result)


@dataclass
class Config:
    spec: ModelSpec
    batch: int
    threads: int
    dtype: str
    notes: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.spec.title} b{self.batch}, {self.threads} thread{'s' if self.threads > 1 else ''}"


def _input(spec: ModelSpec, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, spec.size, spec.size, generator=g)


def _torch_call(model: nn.Module, x: torch.Tensor, dtype: str) -> Callable[[], object]:
    if dtype == "fp32":
        def run():
            with torch.inference_mode():
                return model(x)
    else:
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=DTYPES[dtype]):
                return model(x)
    return run


def _timed_build(make: Callable[[], Callable[[], object]], compiled: bool = False) -> Variant:
    """Build a variant and call it once, timed. ``compiled``: it must have compiled a graph (a
    torch.compile that fell back to eager, e.g. at dynamo's recompile limit, is refused)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    fn = make()
    fn()
    t = time.perf_counter() - t0
    if compiled and counters["stats"]["unique_graphs"] == graphs:
        raise RuntimeError("torch.compile compiled no graph: dynamo ran the model in eager")
    return Variant(fn, t)


def _compile(model: nn.Module) -> nn.Module:
    return torch.compile(model, dynamic=False)


def _export_onnx(model: nn.Module, x: torch.Tensor, path: str) -> None:
    """The original model (NCHW, fp32) to ONNX: the TorchScript exporter where torch still has
    it (seconds), else torch.export's (dynamo)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
        except TypeError:  # no dynamo= keyword: an old torch, TorchScript exporter only
            torch.onnx.export(model, (x,), path, opset_version=17)


def _ort_variant(path: str, x: torch.Tensor, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def _openvino_variant(path: str, x: torch.Tensor, threads: int, dtype: str):
    import openvino as ov

    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
           "INFERENCE_PRECISION_HINT": "f32" if dtype == "fp32" else "bf16"}
    req = core.compile_model(core.read_model(path), "CPU", cfg).create_infer_request()
    a = x.numpy()

    def run():
        req.infer({0: a})
        return [req.get_output_tensor(i).data for i in range(len(req.model_outputs))]
    return run


class _EffopsPredict(nn.Module):
    """effops's EfficientDet end to end as a user runs it: the network, then effops's own
    post-processing (``EfficientDet.detect``: C++ candidate selection, decoding, multiclass_nms),
    returned in Detector's form (effdet's [n, max_det, 6] rows x1, y1, x2, y2, score, class; the
    raw head outputs flattened) so that it is compared with effdet's DetBenchPredict."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        cls_out, box_out = self.net(x)
        d = self.net._postprocess((cls_out, box_out))
        det = torch.cat([d.boxes, d.scores[..., None], d.classes[..., None].to(d.boxes.dtype)], -1)
        raw = torch.cat([t.flatten(1) for t in list(cls_out) + list(box_out)], 1)
        return det, raw


def _effops_models_make(spec: ModelSpec, original: nn.Module):
    """effops's own model of this name carrying the original's weights (``create_model(name)``,
    then the original's state dict, strictly: effops.models keeps timm's and effdet's parameter
    names), or the reason it is not timed. Detectors: effops's network and post-processing."""
    try:
        from .. import models as em
    except ImportError as e:
        return None, f"effops.models not importable ({e})"
    if not hasattr(em, "create_model") or not hasattr(em, "list_models"):
        return None, "effops.models has no create_model yet"
    if spec.name not in em.list_models():
        return None, f"effops.models has no {spec.name}"

    def make():
        if spec.family == "timm":
            m = em.create_model(spec.name)
            m.load_state_dict(original.state_dict())
            return m.eval()
        net = em.create_model(spec.name, image_size=(spec.size, spec.size))
        net.load_state_dict(original.bench.model.state_dict())
        return _EffopsPredict(net.eval())
    return make, None


def _errors_fn(ref):
    """outputs -> label -> max |y - ref| / max |ref| (detectors: of the raw head outputs, and of
    the sorted detection scores, whichever is larger)."""
    def rel(a, b) -> float:
        a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        if a.shape != b.shape:
            return float("inf")
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    def err(out) -> float:
        if isinstance(ref, torch.Tensor):
            o = out[0] if isinstance(out, (list, tuple)) else out
            return rel(o, ref)
        det, raw = out[0], out[1]
        ref_det, ref_raw = ref
        scores = torch.as_tensor(det)[..., 4].float().sort(-1, descending=True).values
        return max(rel(raw, ref_raw), rel(scores, ref_det[..., 4].float().sort(-1, descending=True).values))

    return lambda outs: {k: err(v) for k, v in outs.items()}


def inference_variants(cfg: Config, original: nn.Module, x: torch.Tensor, *, compile_: bool,
                       wrong: Optional[Dict[str, nn.Module]] = None) -> Dict[str, Variant]:
    """Build every variant of one configuration (each timed from model build to first result).
    ``wrong``: label -> a model to use instead (tests inject one that disagrees)."""
    from ..nn import convert

    spec, dt = cfg.spec, cfg.dtype
    x_cl = x.contiguous(memory_format=CL)
    out: Dict[str, Variant] = {}

    def add(label, make):
        try:
            out[label] = _timed_build(make, compiled=label.startswith("torch.compile"))
        except Exception as e:  # a baseline that cannot run here: said, not hidden
            cfg.notes.append(f"{label}: not timed, could not be built ({type(e).__name__}: {str(e)[:160]})")

    def torch_model(label, make_model, inp):
        def make():
            m = (wrong or {}).get(label)
            m = make_model() if m is None else m
            return _torch_call(m, inp, dt)
        add(label, make)

    torch_model("eager (NCHW)", lambda: build_original(spec), x)
    torch_model("eager (channels_last)", lambda: build_original(spec).to(memory_format=CL), x_cl)
    torch_model(EFFOPS, lambda: convert(build_original(spec)).to(memory_format=CL), x_cl)
    if compile_:
        torch_model("torch.compile", lambda: _compile(build_original(spec).to(memory_format=CL)), x_cl)
        torch_model("torch.compile (effops)", lambda: _compile(convert(build_original(spec)).to(memory_format=CL)),
                    x_cl)
    make, why = _effops_models_make(spec, original)
    if make is None:
        cfg.notes.append(f"effops.models: not timed ({why})")
    else:
        torch_model("effops.models", lambda: make().to(memory_format=CL), x_cl)
    _onnx_variants(cfg, x, add, out)
    return out


def _onnx_variants(cfg: Config, x: torch.Tensor, add, out: Dict[str, Variant]) -> None:
    have = {}
    for mod in ("onnx", "onnxruntime", "openvino"):
        try:
            __import__(mod)
            have[mod] = True
        except ImportError:
            have[mod] = False
    want = []
    if not have["onnxruntime"]:
        cfg.notes.append("onnxruntime: not installed (pip install 'effops[bench]'), skipped")
    elif cfg.dtype != "fp32":
        cfg.notes.append("onnxruntime: skipped for bf16 (its CPU provider has no bf16 convolutions)")
    else:
        want.append("onnxruntime")
    if not have["openvino"]:
        cfg.notes.append("openvino: not installed (pip install 'effops[bench]'), skipped")
    else:
        want.append("openvino")
    if not want:
        return
    if not have["onnx"]:
        cfg.notes.append("onnx: not installed (the exporter needs it), onnxruntime / openvino skipped")
        return
    tmp = tempfile.mkdtemp(prefix="effops-bench-")
    path = os.path.join(tmp, "model.onnx")
    t0 = time.perf_counter()
    original = build_original(cfg.spec)
    # detectors: the network is exported, effdet's post-processing (TorchScript functions, which
    # do not export) runs in PyTorch on the runtime's outputs, as a user of these runtimes does
    det = original if isinstance(original, Detector) else None
    try:
        _export_onnx(original if det is None else det.bench.model, x, path)
    except Exception as e:
        cfg.notes.append(f"ONNX export failed ({type(e).__name__}: {str(e)[:160]}): {', '.join(want)} skipped")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    export_s = time.perf_counter() - t0
    if det is not None:
        cfg.notes.append("onnxruntime / openvino: the network in the runtime, effdet's post-processing in PyTorch")

    def with_post(run):
        if det is None:
            return run
        levels = det.bench.num_levels

        def run_det():
            outs = [torch.from_numpy(o) for o in run()]
            return det.postprocess(x.shape[0], outs[:levels], outs[levels:])
        return run_det

    if "onnxruntime" in want:
        add("onnxruntime", lambda: with_post(_ort_variant(path, x, cfg.threads)))
    if "openvino" in want:
        add("openvino", lambda: with_post(_openvino_variant(path, x, cfg.threads, cfg.dtype)))
    shutil.rmtree(tmp, ignore_errors=True)  # both runtimes have read the file
    for label in want:  # each would have had to build the model and export it
        if label in out:
            out[label].first_s += export_s


def inference_case(cfg: Config, *, compile_: bool, target_s: float,
                   wrong: Optional[Dict[str, nn.Module]] = None) -> Tuple[Case, Dict[str, Variant]]:
    dev = torch.device("cpu")
    original = build_original(cfg.spec)
    x = _input(cfg.spec, cfg.batch)
    with torch.inference_mode():
        ref = original(x)
    # detectors: the network's multiply-adds (the post-processing has none, and its TorchScript
    # functions do not run under the counter's dispatch mode)
    macs = count_macs(original.bench.model if isinstance(original, Detector) else original, x)
    itemsize = 4 if cfg.dtype == "fp32" else 2
    nbytes = compulsory_bytes(original, x, itemsize)
    variants = inference_variants(cfg, original, x, compile_=compile_, wrong=wrong)
    peak = fma_peak(dev, DTYPES[cfg.dtype])
    bw = copy_bandwidth(dev)
    fixed = {"compute floor": 2 * macs / (peak * 1e9), "traffic floor": nbytes / (bw * 1e9)}
    case = Case("model inference", cfg.name, cfg.dtype, {k: v.fn for k, v in variants.items()}, bytes_moved=nbytes,
                errors=_errors_fn(ref), tolerance=TOLERANCE[cfg.dtype], fixed=fixed, flops=2 * macs)
    case.note = (f"{macs / 1e9:.2f} GMAC, {nbytes / 1e6:.1f} MB compulsory traffic; measured peak "
                 f"{peak:.1f} GFLOP/s ({cfg.dtype}, best of a matmul and a 3x3 conv), copy {bw:.1f} GB/s")
    return case, variants


# ----------------------------------------------------------------------------- training step
def _train_step(model: nn.Module, x: torch.Tensor, spec: ModelSpec, dtype: str) -> Callable[[], torch.Tensor]:
    """forward + loss + backward + SGD step; returns the loss (so equal steps can be compared)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    if spec.family == "timm":
        target = torch.randint(0, 1000, (x.shape[0],), generator=g)

        def loss_of(out):
            return nn.functional.cross_entropy(out.float(), target)
    else:  # effdet: focal + box loss through its own training bench
        from effdet import DetBenchTrain

        model = DetBenchTrain(model)
        n, s = x.shape[0], x.shape[-1]
        xy = torch.rand(n, 4, 2, generator=g) * s * 0.5
        wh = torch.rand(n, 4, 2, generator=g) * s * 0.4 + 16
        target = {"bbox": torch.cat([xy, xy + wh], -1)[..., [1, 0, 3, 2]], "cls": torch.randint(1, 91, (n, 4), generator=g).float()}

        def loss_of(out):
            return out["loss"]
    fwd = model if spec.family == "timm" else (lambda inp: model(inp, target))
    ac = dtype != "fp32"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=DTYPES[dtype], enabled=ac):
            out = fwd(x)
        loss = loss_of(out)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def train_case(spec: ModelSpec, batch: int, threads: int, dtype: str, *, compile_: bool) -> Tuple[Case, Dict[str, Variant], List[str]]:
    from ..nn import convert

    notes: List[str] = []
    x = _input(spec, batch)
    x_cl = x.contiguous(memory_format=CL)
    makers = {
        "eager (NCHW)": lambda: _train_step(build_original(spec, train=True), x, spec, dtype),
        "eager (channels_last)": lambda: _train_step(build_original(spec, train=True).to(memory_format=CL), x_cl,
                                                     spec, dtype),
        EFFOPS: lambda: _train_step(convert(build_original(spec, train=True)).to(memory_format=CL), x_cl, spec, dtype),
    }
    if compile_:
        makers["torch.compile"] = lambda: _train_step(_compile(build_original(spec, train=True).to(memory_format=CL)),
                                                      x_cl, spec, dtype)
        makers["torch.compile (effops)"] = lambda: _train_step(
            _compile(convert(build_original(spec, train=True)).to(memory_format=CL)), x_cl, spec, dtype)
    variants: Dict[str, Variant] = {}
    for label, make in makers.items():
        try:
            variants[label] = _timed_build(make, compiled=label.startswith("torch.compile"))
        except Exception as e:
            notes.append(f"{label}: not timed, could not be built ({type(e).__name__}: {str(e)[:160]})")
    # every variant has now taken one step from the same weights; the check call takes the second
    ref_step = _train_step(build_original(spec, train=True), x, spec, "fp32")
    ref_step()
    ref = ref_step()
    # forward + backward = 3x the forward's multiply-adds (grad input and grad weight each cost what
    # the forward does; torch.utils.flop_counter ignores groups in the conv backward, counting a
    # depthwise backward as a dense one)
    net = build_original(spec)
    flops = 3 * 2 * count_macs(net.bench.model if isinstance(net, Detector) else net, x)
    peak = fma_peak(torch.device("cpu"), DTYPES[dtype])

    def errors(outs):
        return {k: (abs(float(v) - float(ref)) / max(abs(float(ref)), 1e-12)) for k, v in outs.items()}

    name = f"{spec.title} b{batch}, {threads} thread{'s' if threads > 1 else ''}"
    case = Case("model train step", name, dtype, {k: v.fn for k, v in variants.items()}, errors=errors,
                tolerance=TRAIN_TOLERANCE[dtype], fixed={"compute floor": flops / (peak * 1e9)}, flops=flops)
    case.note = f"{flops / 2e9:.2f} GMAC per step (forward + backward), measured peak {peak:.1f} GFLOP/s"
    return case, variants, notes


def validate(models: Sequence[str], batches: Sequence[int], threads: Sequence[int], dtypes: Sequence[str]) -> None:
    for m in models:
        if m not in MODELS:
            raise ValueError(f"models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype: must be one of {list(DTYPES)}, got {d!r}")
    for name, vals in (("batch", batches), ("threads", threads)):
        if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
            raise ValueError(f"{name}: positive integers required, got {list(vals)}")


def _cold_case(case: Case, variants: Dict[str, Variant]) -> Case:
    timed = {k: v.first_s for k, v in variants.items() if k not in case.refused}
    c = Case("model cold start", case.name, case.dtype, {}, fixed=timed)
    c.note = "model build + conversion / compilation / export + first call, seconds"
    return c


def _fmt_cold(case: Case, rows) -> str:
    return "  cold start (s): " + ", ".join(f"{r['backend']} {float(r['median_ms']) / 1e3:.2f}" for r in rows)


def run(models: Sequence[str] = (), batches: Sequence[int] = (1, 8), threads: Sequence[int] = (1, 2),
        dtypes: Sequence[str] = ("fp32", "bf16"), *, quick: bool = False, train: bool = False, cold: bool = False,
        target_s: float = 1.0, results_dir: Optional[str] = None, log=print,
        wrong: Optional[Dict[str, nn.Module]] = None, train_only: bool = False) -> List[Dict[str, object]]:
    """Run the whole-network benchmark; returns the rows (appended to results_dir's CSV too).
    train_only: the training step rows alone (batches and cold do not apply)."""
    train = train or train_only
    validate(models, batches, threads, dtypes)
    if quick:
        specs, batches, threads, dtypes, target_s = [QUICK], [1], [1], [d for d in dtypes if d == "fp32"] or ["fp32"], \
            min(target_s, 0.3)
    else:
        specs = [MODELS[m] for m in (models or MODELS)]
    if cold:  # torch.compile pays its whole compilation: no kernels from an earlier run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="effops-inductor-")
    dev = torch.device("cpu")
    rows: List[Dict[str, object]] = []
    saved = torch.get_num_threads()
    try:
        for spec in specs:
            for t in threads:
                torch.set_num_threads(t)
                for dt in dtypes:
                    for b in () if train_only else batches:
                        cfg = Config(spec, b, t, dt)
                        torch._dynamo.reset()  # each configuration compiles afresh (and under the recompile limit)
                        case, variants = inference_case(cfg, compile_=not quick, target_s=target_s, wrong=wrong)
                        first = {k: v.first_s for k, v in variants.items()}
                        rows += run_cases([case], dev, target_s=target_s, results_dir=results_dir, log=log,
                                          formatter=lambda c, r: format_model_case(c, r, first, cfg.notes))
                        if cold:
                            rows += run_cases([_cold_case(case, variants)], dev, results_dir=results_dir, log=log,
                                              formatter=_fmt_cold)
                        del case, variants
                    if train:
                        b = 8
                        torch._dynamo.reset()
                        case, variants, notes = train_case(spec, b, t, dt, compile_=not quick)
                        first = {k: v.first_s for k, v in variants.items()}
                        rows += run_cases([case], dev, target_s=target_s, results_dir=results_dir, log=log,
                                          formatter=lambda c, r: format_model_case(c, r, first, notes))
    finally:
        torch.set_num_threads(saved)
    return rows


def from_args(args) -> int:
    """``effops bench models ...`` and ``effops bench --profile MODEL`` (see cli.py)."""
    threads = args.threads or [1, 2]
    models = args.models or ([args.profile] if args.profile else [])
    try:
        if args.device != "cpu":
            raise ValueError("device: whole-network cases run on the CPU (--device cpu)")
        validate(models, args.batch, threads, args.dtype)
    except ValueError as e:
        print(f"effops bench models: {e}", file=sys.stderr)
        return 2
    from .. import _memory

    # every variant in this process alike (ONNX Runtime and OpenVINO allocate from arenas of their own)
    kept = not getattr(args, "default_malloc", False) and _memory.reuse_freed_memory()
    if args.profile:
        from .profile import format_profile, profile_model

        spec = QUICK if args.quick else MODELS[args.profile]
        spec = ModelSpec(args.profile, MODELS[args.profile].family, spec.size)
        prof = profile_model(spec, batch=args.batch[0], threads=threads[0], dtype=args.dtype[0])
        print(format_profile(prof))
        return 0
    from .harness import device_name

    print(f"effops bench models on {device_name(torch.device('cpu'))}, torch {torch.__version__}; "
          f"'effops x' = variant time / effops time (effops' speed-up over it); 'x compute' / 'x traffic' = "
          f"time / floor; malloc: {'freed memory kept for reuse (effops.reuse_freed_memory)' if kept else 'default'}")
    run(models, args.batch, threads, args.dtype, quick=args.quick, train=args.train, cold=args.cold,
        target_s=args.time, results_dir=None if args.no_save else args.results,
        train_only=getattr(args, "train_only", False))
    if not args.no_save:
        print(f"rows appended to {args.results}/")
    return 0

