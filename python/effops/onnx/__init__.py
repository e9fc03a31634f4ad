"""ONNX export of models built on effops: ``effops.onnx.export(model, example_inputs, path)``.

The written graph uses only standard ONNX operators (the default domain), so ONNX Runtime - or
any runtime - runs it without effops installed. The fused custom ops are lowered to the
sequences they compute (``_convs.py``: Conv with folded BatchNorm and asymmetric pads,
activations, GlobalAveragePool, Mul/Add, MaxPool, Resize; ``_nms.py``: NonMaxSuppression, with
the places where ONNX's semantics differ from effops's documented there).

How, and why this mechanism:

1. ``torch.export.export`` traces the model. The effops ops are ``torch.library`` custom ops
   with fake kernels, so they appear as single ``effops::*`` nodes with their arguments
   (stride, resolved padding, activation names, modes) as constants - the exported program
   is the op-level graph, exactly what needs lowering, and it runs (and is tested) on its own.
2. ``torch.onnx.export(exported_program, dynamo=True, custom_translation_table=...)``
   translates it, with one function per effops op that emits standard ONNX nodes (onnxscript
   in trace mode). The lowering sees each op's own arguments, so TF 'same' padding, BatchNorm
   folding and the resampling modes map to ONNX attributes directly. The alternatives: the
   TorchScript exporter (``dynamo=False`` + ``register_custom_op_symbolic``) is the legacy path
   (torch warns on it; the torch.export-based exporter is the default since torch 2.9) and
   traces a second, separate graph; exporting the ops' pure-PyTorch
   reference path instead would give Pad + Conv + Mul + Add per fused conv for ONNX Runtime
   to re-fuse, and cannot export NMS at all (its reference is a data-dependent Python loop).
3. onnxscript's optimizer folds constants with the size limits lifted (so every
   ``W * bn_scale`` becomes one initializer) and removes dead nodes; the dynamic batch axis is
   named ``batch``; a graph check asserts that only standard-domain operators remain.

Inputs: a module (exported in eval mode - BatchNorm with running statistics, no dropout - each
module's mode restored afterwards, as torch.onnx's ``TrainingMode.EVAL``), example input
tensors, and ``dynamic_batch`` (default True: axis 0 of every input and output is symbolic;
the other axes stay static - TF 'same' padding and the BiFPN resampling are resolved for the
example's spatial size, and ONNX Runtime refuses inputs of another size). Models that call an effops op
without an ONNX lowering (soft_nms, matrix_nms, the backward ops) are refused with the module
that calls it. Outputs are flattened in pytree order (EfficientDet: 5 class maps, then 5 box
maps; a Detections tuple: boxes, scores, classes, num_detections).

Requires the ``onnx`` and ``onnxscript`` packages (``pip install onnx onnxscript``;
``onnxruntime`` to run or ``compare`` the result).
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..ops._common import EffopsInputError, EffopsTypeError

DEFAULT_OPSET = 18  # the opset torch's exporter implements (TORCHLIB_OPSET); lower ones are refused
_STANDARD_DOMAINS = ("", "ai.onnx")
_FOLD_LIMIT = 1 << 28  # elements: fold every constant subgraph (BN into conv weights) whatever its size


def translations() -> dict:
    """The lowering of every effops op that has one: {torch.ops.effops.<op>.default: function}."""
    from . import _convs, _nms

    return {**_convs.translations(), **_nms.translations()}


def supported_ops() -> List[str]:
    """Names of the effops ops ``export`` lowers to standard ONNX."""
    return sorted(t.name() for t in translations())


def availability() -> str:
    """One line for ``effops info``: whether ``export`` can run here (package versions), or what to
    install. Reads package metadata only (importing the exporter takes seconds)."""
    from importlib import metadata

    versions, missing = [], []
    for pkg in ("onnx", "onnxscript", "onnxruntime"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            missing.append(pkg)
    if missing:
        need = [p for p in missing if p != "onnxruntime"]
        head = f"unavailable: pip install {' '.join(need)}" if need else "export available, cannot run the result here"
        return f"{head} (missing {', '.join(missing)}; or pip install 'effops[onnx]')"
    return f"effops.onnx.export, opset {DEFAULT_OPSET}, standard ops only ({', '.join(versions)})"


# ------------------------------------------------------------------------------ checks
def _as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise EffopsTypeError("effops.onnx.export: example_inputs must be a tensor or a non-empty tuple of tensors, "
                              f"got {type(example_inputs).__name__}")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise EffopsTypeError(f"effops.onnx.export: example_inputs[{i}] must be a tensor, got {type(t).__name__}")
    return tuple(example_inputs)


class _EvalMode:
    """The model in eval mode for the export, each module's own mode restored afterwards (what
    torch.onnx's TrainingMode.EVAL does): ONNX export writes the inference graph."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def _batch_shapes(args: tuple, dynamic_batch: bool):
    if not dynamic_batch:
        return None
    sizes = set()
    for i, t in enumerate(args):
        if t.dim() == 0:
            raise EffopsInputError(f"effops.onnx.export: example_inputs[{i}] is 0-d; dynamic_batch needs a batch axis "
                                   "(axis 0) on every input (or dynamic_batch=False)")
        sizes.add(t.shape[0])
    if len(sizes) > 1:
        raise EffopsInputError(f"effops.onnx.export: example inputs have different batch sizes {sorted(sizes)}; "
                               "dynamic_batch makes axis 0 of every input one symbolic batch")
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in args)


def _by_parameter(model: nn.Module, args: tuple, shapes):
    """dynamic_shapes in the structure of ``model.forward``'s parameters (a ``*args`` forward
    takes one tuple of specs for all its positional inputs)."""
    if shapes is None:
        return None
    import inspect

    try:
        bound = inspect.signature(model.forward).bind(*args)
    except (TypeError, ValueError) as e:
        raise EffopsInputError(f"effops.onnx.export: example_inputs do not fit {type(model).__name__}.forward: {e}") from None
    out, i = {}, 0
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(shapes[i + j] for j in range(len(value)))
            i += len(value)
        else:
            out[name] = shapes[i]
            i += 1
    return out


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path, cls = list(stack.values())[-1]
    name = getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].strip("'>")
    return f"{path or '<root>'} ({name})"


def _check_lowerings(ep, table: dict) -> None:
    """Every effops op in the program has a lowering; name the module of the first that has not."""
    have = {t.name() for t in table}
    for node in ep.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace == "effops" and target.name() not in have:
            raise EffopsInputError(
                f"effops.onnx.export: module {_module_of(node)} calls {target.name()}, which has no ONNX lowering "
                f"(lowered: {', '.join(sorted(have))}); keep it out of the exported module (e.g. run it on the "
                "ONNX outputs) or use an op that has one")


def _rename_batch(proto, batch_sym: Optional[str]) -> None:
    if not batch_sym:
        return
    g = proto.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param == batch_sym:
                d.dim_param = "batch"


def check_standard(proto) -> None:
    """Raise if any node (or local function) of the ONNX model is outside the standard domain."""
    bad = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in _STANDARD_DOMAINS})
    if bad or len(proto.functions):
        raise RuntimeError(f"effops.onnx: the exported graph is not standard ONNX: nodes {bad}, "
                           f"{len(proto.functions)} local functions")


# ------------------------------------------------------------------------------ export
def export(model: nn.Module, example_inputs, path, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
           input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
           fold_constants: bool = True) -> str:
    """Export ``model`` (in eval mode) traced on ``example_inputs`` to an ONNX file at ``path`` that
    uses only standard ONNX operators; returns the path. See the module docstring.

    Args:
        model: the module (effops models, models converted by ``effops.nn.convert``, or any
            module calling effops ops with lowerings: ``supported_ops()``).
        example_inputs: a tensor or a tuple of tensors, as ``model(*example_inputs)``.
        path: the .onnx file to write (parent folders must exist).
        opset: the ONNX opset, >= 18 (what torch's exporter implements).
        dynamic_batch: axis 0 of every input (and output) symbolic, named ``batch`` (a batch-1
            example is traced as two copies: torch.export would specialise size 1).
        input_names / output_names: names for the graph's inputs / flattened outputs.
        fold_constants: fold BatchNorm into the conv weights and every other constant
            subgraph (the graph ORT would fold at load time anyway).
    """
    import inspect

    import onnx  # a clear ImportError before any work
    import onnxscript.optimizer

    if "custom_translation_table" not in inspect.signature(torch.onnx.export).parameters:
        raise RuntimeError(f"effops.onnx.export needs torch's dynamo-based ONNX exporter with custom translation "
                           f"tables (torch.onnx.export(..., custom_translation_table=...)); torch {torch.__version__} "
                           "has none: upgrade torch (tested with 2.14)")

    if not isinstance(model, nn.Module):
        raise EffopsTypeError(f"effops.onnx.export: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise EffopsTypeError(f"effops.onnx.export: path must be a str or os.PathLike, got {type(path).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise EffopsTypeError(f"effops.onnx.export: opset must be an int, got {type(opset).__name__}")
    if opset < DEFAULT_OPSET:
        raise EffopsInputError(f"effops.onnx.export: opset must be >= {DEFAULT_OPSET} (torch's ONNX exporter "
                               f"implements opset {DEFAULT_OPSET}; the lowerings use its Resize/ReduceSum forms), got {opset}")
    if not isinstance(dynamic_batch, bool):
        raise EffopsTypeError(f"effops.onnx.export: dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    args = _as_inputs(example_inputs)
    table = translations()
    shapes = _batch_shapes(args, dynamic_batch)  # checks every input has the one batch axis
    if dynamic_batch and args[0].shape[0] == 1:
        # torch.export specialises a size-1 axis to the constant 1: trace on the batch doubled
        args = tuple(torch.cat([t, t]) for t in args)
    with torch.no_grad(), _EvalMode(model):
        ep = torch.export.export(model, args, dynamic_shapes=_by_parameter(model, args, shapes))
    _check_lowerings(ep, table)
    program = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=table, opset_version=opset,
                                optimize=False, input_names=list(input_names) if input_names else None,
                                output_names=list(output_names) if output_names else None, verbose=False)
    if fold_constants:
        onnxscript.optimizer.optimize_ir(program.model, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT)
    proto = program.model_proto
    batch_sym = None
    if dynamic_batch:
        d0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
        batch_sym = d0.dim_param or None
    _rename_batch(proto, batch_sym)
    check_standard(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, os.fspath(path))
    return os.fspath(path)


# ------------------------------------------------------------------------------ parity
def _flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in out for t in _flatten(out[k])]
    raise EffopsTypeError(f"effops.onnx.compare: model output of type {type(out).__name__} is not a tensor or a "
                          "(nested) tuple/list/dict of tensors")


def run(path, inputs, *, threads: int = 1) -> List["object"]:
    """Run the ONNX file with ONNX Runtime (CPU) on ``inputs`` (tensors); returns numpy arrays."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), _as_inputs(inputs))}
    return sess.run(None, feeds)


def compare(path, model: nn.Module, inputs, *, threads: int = 1) -> Dict[str, float]:
    """ONNX Runtime's outputs against ``model(*inputs)`` in PyTorch: the max absolute error, the
    max error relative to each output's max magnitude, and the number of outputs."""
    args = _as_inputs(inputs)
    t0 = time.perf_counter()
    got = run(path, args, threads=threads)
    ort_s = time.perf_counter() - t0
    with torch.no_grad():
        want = _flatten(model(*args))
    if len(got) != len(want):
        raise RuntimeError(f"effops.onnx.compare: the ONNX graph has {len(got)} outputs, the model {len(want)}")
    abs_err = rel_err = 0.0
    for g, w in zip(got, want):
        g = torch.from_numpy(g)
        if tuple(g.shape) != tuple(w.shape):
            raise RuntimeError(f"effops.onnx.compare: output shapes differ: ONNX {list(g.shape)}, model {list(w.shape)}")
        if w.numel() == 0:
            continue
        e = (g.double() - w.double()).abs().max().item()
        abs_err = max(abs_err, e)
        rel_err = max(rel_err, e / max(w.double().abs().max().item(), 1e-30))
    return {"max_abs": abs_err, "max_rel": rel_err, "outputs": len(want), "ort_seconds": ort_s}


__all__ = ["export", "compare", "run", "supported_ops", "translations", "check_standard", "availability",
           "DEFAULT_OPSET"]
