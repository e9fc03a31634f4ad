"""Loads the compiled backends and decides which backend runs an op.

Backends: ``cpu`` (effops._C, C++), ``cuda`` (effops._cuda), ``triton`` (effops.triton) and
``reference`` (the pure-PyTorch function in effops/ops/<family>.py). By default a CPU tensor runs
on ``cpu``; a CUDA tensor on ``cuda`` when it was built and can talk to the driver, else on
``triton``, else on ``reference``. ``EFFOPS_BACKEND=cpu|cuda|triton|reference`` or the
``use_backend(...)`` context manager forces one (an error if it cannot run the op there).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

BACKENDS = ("cpu", "cuda", "triton", "reference")


class _DLPackCalls:
    """A compiled module whose functions take tensors as DLPack capsules.

    nanobind imports a tensor argument by calling ``Tensor.__dlpack__``, a Python method that
    costs ~2 us per tensor (version, stream and grad checks); a kernel call with 8 tensor
    arguments spent more time there than in the kernel at small shapes. The ops validate
    their arguments before calling, so this passes ``torch.utils.dlpack.to_dlpack`` capsules
    (~0.2 us), converting tensors and lists of tensors in the arguments; other attributes pass
    through unchanged."""

    def __init__(self, module):
        self._module = module
        self._calls: Dict[str, object] = {}

    def __getattr__(self, name: str):
        fn = self._calls.get(name)
        if fn is None:
            fn = getattr(self._module, name)
            if callable(fn):
                fn = self._calls[name] = _with_capsules(fn)
        return fn


def _capsule(a):
    if isinstance(a, torch.Tensor):
        return _to_dlpack(a)
    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
        return [_to_dlpack(t) for t in a]
    return a


def _with_capsules(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*[_capsule(a) for a in args], **{k: _capsule(v) for k, v in kwargs.items()})
    return call


def source_checkout() -> Optional[str]:
    """The root of the effops source checkout this package runs from (an editable install or
    PYTHONPATH=python), or None for an installed wheel."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        with open(os.path.join(root, "pyproject.toml")) as f:
            is_effops = 'name = "effops"' in f.read()
    except OSError:
        return None
    return root if is_effops and os.path.isdir(os.path.join(root, "csrc")) else None


def reinstall_hint(cuda: bool = False) -> str:
    """How to get the compiled modules back, for this install: rebuild the checkout it runs from,
    or reinstall the wheel / build from a checkout (effops is not on a package index)."""
    env = "EFFOPS_CUDA=ON " if cuda else ""
    root = source_checkout()
    if root is not None:
        return f"rebuild it from this checkout: cd {root} && {env}pip install -e . (pip install -v shows the compile)"
    if cuda:
        return ("install a wheel built with nvcc (.ci/build-wheel), or build from a source checkout with nvcc on "
                "PATH: EFFOPS_CUDA=ON pip install ./effops")
    return ("reinstall the wheel (pip install --force-reinstall effops-*.whl) or build from a source checkout: "
            "pip install ./effops")


if importlib.util.find_spec(f"{__package__}._C") is None:
    # Checked first: ``from . import _C`` on a missing module reports "cannot import name '_C'
    # from partially initialized module ... (most likely due to a circular import)".
    _C = None
    _C_ERROR: Optional[str] = (f"effops was installed without its compiled CPU module (effops._C): "
                               f"{reinstall_hint()}")
else:
    try:
        from . import _C as _C_module  # type: ignore[attr-defined]

        _C = _DLPackCalls(_C_module)
        _C_ERROR = None
    except ImportError as e:  # a module that is there but does not load (wrong Python, missing library)
        _C = None
        _C_ERROR = f"effops._C failed to load ({type(e).__name__}: {e}): {reinstall_hint()}"


def torch_openmp_runtime() -> Optional[str]:
    """The path of the OpenMP runtime library torch runs its CPU ops on (Linux), or None."""
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1].split("\n")[0]:
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "omp" in line}
    except OSError:
        return None
    names = ("libgomp", "libiomp5", "libomp")
    paths = sorted(p for p in paths if os.path.basename(p).startswith(names))
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
    own = [p for p in paths if p.startswith(os.path.join(torch_dir, "torch"))]  # torch/lib, torch.libs
    if own:
        return own[0]
    return paths[0] if len(paths) == 1 else None  # a system runtime; ambiguous if several


def _setup_parallel() -> str:
    """effops's CPU kernels run their parallel loops on torch's OpenMP threads when they can
    (EFFOPS_PARALLEL=auto, the default, or openmp), else on effops's own pool (pool)."""
    want = os.environ.get("EFFOPS_PARALLEL", "auto").strip().lower() or "auto"
    if want not in ("auto", "openmp", "pool"):
        raise ValueError(f"EFFOPS_PARALLEL={want!r}: expected auto, openmp or pool")
    if want == "pool":
        return "pool (EFFOPS_PARALLEL=pool)"
    path = torch_openmp_runtime()
    if path is None:
        if want == "openmp":
            raise RuntimeError("EFFOPS_PARALLEL=openmp: torch's OpenMP runtime was not found in this process")
        return "pool (torch's OpenMP runtime not found)"
    why = _C_module.use_openmp_runtime(path)
    if why:
        if want == "openmp":
            raise RuntimeError(f"EFFOPS_PARALLEL=openmp: {why}")
        return f"pool ({why})"
    return f"torch's OpenMP threads ({path})"


PARALLEL = _setup_parallel() if _C is not None else "none"

#: CPU ISA levels of the kernels, lowest first (x86-64 baseline, x86-64-v3, x86-64-v4).
ISA_LEVELS = ("baseline", "avx2", "avx512")


def detected_isa() -> str:
    """The highest level this CPU runs: 'avx512' (AVX-512 F/BW/VL/DQ), 'avx2' (AVX2 + FMA) or
    'baseline'."""
    return ISA_LEVELS[_C_module.detected_isa()] if _C is not None else "baseline"


def isa() -> str:
    """The level the CPU kernels run at now (the detected one, capped by ``set_isa``)."""
    return ISA_LEVELS[_C_module.isa()] if _C is not None else "baseline"


def set_isa(level: Optional[str]) -> str:
    """Cap the CPU kernels' ISA level: 'avx512', 'avx2', 'baseline', or None for the highest the
    CPU has. A level above the CPU's runs at the CPU's (never an illegal instruction); returns
    the level now in use. ``EFFOPS_ISA`` sets it at import. Process-wide: call it between
    ops, not while another thread runs one."""
    if level is None or level == "auto":
        index = len(ISA_LEVELS) - 1
    elif isinstance(level, str) and level.strip().lower() in ISA_LEVELS:
        index = ISA_LEVELS.index(level.strip().lower())
    else:
        raise ValueError(f"set_isa: level must be one of {list(ISA_LEVELS)} or None, got {level!r}")
    if _C is None:
        return "baseline"
    return ISA_LEVELS[_C_module.set_isa(index)]


@contextlib.contextmanager
def use_isa(level: Optional[str]) -> Iterator[str]:
    """``with effops.use_isa('avx2'):`` runs the block at that level (capped by the CPU's)."""
    before = isa()
    try:
        yield set_isa(level)
    finally:
        set_isa(before)


def amx() -> bool:
    """Whether the bf16 pointwise GEMMs run on the AMX tiles now: the CPU has AMX-TILE and
    AMX-BF16, Linux granted the tile state, the level is 'avx512', and ``set_amx`` has not turned
    them off."""
    return bool(_C_module.amx()) if _C is not None else False


def set_amx(on: bool) -> bool:
    """Turn the AMX kernels on or off (``EFFOPS_AMX=0`` turns them off at import): the bf16 1x1
    convs' tile GEMM and the int8 pointwise GEMM's. Returns whether the bf16 ones run now (never on
    a CPU without AMX). Off, bf16 1x1 convs run the AVX512_BF16 (vdpbf16ps) or float GEMM and
    int8 the VNNI one. Process-wide: call it between ops."""
    if not isinstance(on, bool):
        raise TypeError(f"set_amx: on must be a bool, got {type(on).__name__}")
    return bool(_C_module.set_amx(on)) if _C is not None else False


@contextlib.contextmanager
def use_amx(on: bool) -> Iterator[bool]:
    """``with effops.use_amx(False):`` runs the block without the AMX kernels."""
    before = bool(_C_module.amx_on()) if _C is not None else True
    try:
        yield set_amx(on)
    finally:
        set_amx(before)


def set_vnni(on: bool) -> str:
    """Use the VNNI int8 dot products (AVX-512 VNNI, AVX-VNNI) in the int8 (qconv) kernels where
    the CPU has them (``EFFOPS_VNNI=0`` turns them off at import). Off, the kernels run as on a CPU
    without VNNI: AVX2 with the dot products emulated exactly (vpmaddwd), the same integers.
    Returns the int8 level now in use ('avx512-vnni', 'avx-vnni', 'avx2' or 'scalar'). Process-wide:
    call it between ops."""
    if not isinstance(on, bool):
        raise TypeError(f"set_vnni: on must be a bool, got {type(on).__name__}")
    if _C is None:
        return "scalar"
    _C_module.set_vnni(on)
    return _C_module.q_isa()


@contextlib.contextmanager
def use_vnni(on: bool) -> Iterator[str]:
    """``with effops.use_vnni(False):`` runs the block's int8 kernels without VNNI."""
    before = bool(_C_module.vnni_on()) if _C is not None else True
    try:
        yield set_vnni(on)
    finally:
        set_vnni(before)


if _C is not None and os.environ.get("EFFOPS_AMX", "").strip() in ("0", "off", "false", "no"):
    set_amx(False)
if _C is not None and os.environ.get("EFFOPS_VNNI", "").strip() in ("0", "off", "false", "no"):
    set_vnni(False)

if _C is not None and os.environ.get("EFFOPS_ISA", "").strip():
    try:
        set_isa(os.environ["EFFOPS_ISA"])
    except ValueError:
        raise ValueError(f"EFFOPS_ISA={os.environ['EFFOPS_ISA']!r}: expected one of {list(ISA_LEVELS)} or auto") from None

if importlib.util.find_spec(f"{__package__}._cuda") is None:
    _cuda = None
    _CUDA_IMPORT_ERROR: Optional[str] = (
        "effops was built without CUDA kernels (no nvcc or no GPU at build time, or EFFOPS_CUDA=OFF); "
        + reinstall_hint(cuda=True)
    )
else:
    try:
        _cuda = _DLPackCalls(importlib.import_module(f"{__package__}._cuda"))
        _CUDA_IMPORT_ERROR = None
    except ImportError as e:
        _cuda = None
        _CUDA_IMPORT_ERROR = f"effops._cuda failed to load: {e}"

# op name -> backends that implement it (filled by each ops/<family>.py)
_CAPABILITIES: Dict[str, Tuple[str, ...]] = {}
_local = threading.local()


def register_op(name: str, backends: Tuple[str, ...]) -> None:
    unknown = set(backends) - set(BACKENDS)
    assert not unknown, unknown
    _CAPABILITIES[name] = tuple(backends)


def capabilities() -> Dict[str, Tuple[str, ...]]:
    return dict(_CAPABILITIES)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for the ops called in this thread inside the block (None: automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    old = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = old


def forced_backend() -> Optional[str]:
    name = getattr(_local, "forced", None)
    if name is not None:
        return name
    env = os.environ.get("EFFOPS_BACKEND")
    if not env:
        return None
    env = env.strip().lower()
    if not env or env == "auto":
        return None
    if env not in BACKENDS:
        raise ValueError(f"EFFOPS_BACKEND={env!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return env


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as e:  # ImportError, or a broken triton install
        return f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_runtime_error() -> Optional[str]:
    if _cuda is None:
        return _CUDA_IMPORT_ERROR
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        n = _cuda.device_count()
    except RuntimeError as e:  # e.g. the driver is older than the toolkit effops was built with
        return f"effops._cuda cannot use the driver: {e}"
    if n <= 0:
        return "effops._cuda sees no CUDA device"
    return None


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on tensors of ``device``, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device.type}"
        return None if _C is not None else _C_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        return _cuda_runtime_error()
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if triton_interpret() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return f"the triton backend does not run on {device.type}"
    return f"unknown backend {backend!r}"


def select(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors of ``device``."""
    implemented = _CAPABILITIES[op]
    forced = forced_backend()
    if forced is not None:
        if forced not in implemented:
            raise RuntimeError(f"effops.{op} has no {forced} backend (it has: {', '.join(implemented)})")
        why = unavailable_reason(forced, device)
        if why:
            raise RuntimeError(f"effops.{op}: backend {forced!r} was forced but cannot run: {why}")
        return forced
    if device.type == "cpu":
        if "cpu" in implemented:
            why = unavailable_reason("cpu", device)
            if why:
                raise RuntimeError(f"effops.{op}: {why}")
            return "cpu"
        return "reference"
    if device.type == "cuda":
        for b in ("cuda", "triton"):
            if b in implemented and unavailable_reason(b, device) is None:
                return b
    return "reference"


def build_info() -> Dict[str, object]:
    info: Dict[str, object] = {"torch": torch.__version__}
    if _C is not None:
        info["cpu"] = dict(_C.build_info(), threads=PARALLEL, isa=isa(), isa_detected=detected_isa())
    else:
        info["cpu"] = f"unavailable: {_C_ERROR}"
    if _cuda is not None:
        info["cuda"] = dict(_cuda.build_info())
    else:
        info["cuda"] = f"unavailable: {_CUDA_IMPORT_ERROR}"
    err = _triton_import_error()
    if err is None:
        import triton

        info["triton"] = triton.__version__
    else:
        info["triton"] = f"unavailable: {err}"
    return info


def availability(device: torch.device) -> Dict[str, Dict[str, Optional[str]]]:
    """op -> backend -> None (usable here) or the reason it is not."""
    table: Dict[str, Dict[str, Optional[str]]] = {}
    for op, impls in sorted(_CAPABILITIES.items()):
        row = {}
        for b in BACKENDS:
            row[b] = unavailable_reason(b, device) if b in impls else "not implemented"
        table[op] = row
    return table
