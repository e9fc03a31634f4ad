"""Shared fixtures: backends x devices, seeded data generators, markers.

Markers: ``slow`` tests run only with EFFOPS_SLOW=1 (or ``-m slow``); ``gpu`` tests need a CUDA device; ``triton`` tests run Triton kernels, which on the CPU
needs TRITON_INTERPRET=1 (set before the process starts: `TRITON_INTERPRET=1 pytest -m triton`).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import effops

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False


RUN_SLOW = os.environ.get("EFFOPS_SLOW", "0") == "1"


def pytest_collection_modifyitems(config, items):
    # Long tests (marked ``slow``) stay out of the default run: EFFOPS_SLOW=1, or a -m
    # expression that names them, runs them.
    run_slow = RUN_SLOW or "slow" in (config.getoption("-m") or "")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with EFFOPS_SLOW=1 (or -m slow)"))
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "triton" in item.keywords and not (HAS_TRITON and (HAS_CUDA or INTERPRET)):
            item.add_marker(pytest.mark.skip(reason="Triton needs a GPU or TRITON_INTERPRET=1"))


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # The Triton interpreter runs kernels in numpy, which warns on 0/0 (NaN IoU is expected).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        yield


# (backend, device) pairs every op family is tested on.
BACKEND_DEVICES = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("triton", "cpu"), id="triton-interpret", marks=pytest.mark.triton),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.triton]),
]


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    backend, device = request.param
    if backend == "triton" and device == "cpu" and HAS_CUDA and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    with effops.use_backend(backend):
        yield backend, torch.device(device)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def random_boxes(n: int, kind: str = "uniform", *, seed: int = 0, dtype=torch.float32, img: float = 1000.0):
    """Boxes [n, 4] (float64 generation, then cast) and scores [n] of a named distribution."""
    g = gen(seed)
    f64 = torch.float64
    if kind == "uniform":  # sizes 1-100 spread over an img x img image
        xy = torch.rand(n, 2, generator=g, dtype=f64) * img
        wh = 1 + torch.rand(n, 2, generator=g, dtype=f64) * 99
    elif kind == "clustered":  # n boxes jittered around ~n/100 objects
        k = max(1, n // 100)
        centers = torch.rand(k, 2, generator=g, dtype=f64) * img
        sizes = 20 + torch.rand(k, 2, generator=g, dtype=f64) * 180
        o = torch.randint(0, k, (n,), generator=g)
        c = centers[o] + torch.randn(n, 2, generator=g, dtype=f64) * sizes[o] * 0.1
        wh = (sizes[o] * (1 + 0.1 * torch.randn(n, 2, generator=g, dtype=f64))).abs()
        xy = c - wh / 2
    elif kind == "dense":  # heavy overlap in a small area
        xy = torch.rand(n, 2, generator=g, dtype=f64) * 50
        wh = 20 + torch.rand(n, 2, generator=g, dtype=f64) * 40
    elif kind == "mixed":  # sizes over four orders of magnitude
        xy = torch.rand(n, 2, generator=g, dtype=f64) * img
        wh = torch.exp(torch.rand(n, 2, generator=g, dtype=f64) * 9 - 2)
    elif kind == "huge_coords":  # far from the origin and negative
        xy = (torch.rand(n, 2, generator=g, dtype=f64) - 0.5) * 2e6
        wh = 1 + torch.rand(n, 2, generator=g, dtype=f64) * 5e4
    elif kind == "integer":  # integer coordinates: exact ties in IoU
        xy = torch.randint(0, 40, (n, 2), generator=g).to(f64)
        wh = torch.randint(1, 20, (n, 2), generator=g).to(f64)
    else:
        raise ValueError(kind)
    boxes = torch.cat([xy, xy + wh], 1).to(dtype)
    scores = torch.rand(n, generator=g, dtype=f64).to(dtype)
    return boxes, scores


def degenerate_boxes(n: int, *, seed: int = 0, dtype=torch.float32):
    """A mix of proper boxes and every degenerate kind: zero-area, inverted, NaN, +-inf,
    duplicates; scores with ties, NaN, +-inf and -0.0."""
    g = gen(seed)
    boxes, scores = random_boxes(n, "dense", seed=seed, dtype=torch.float64)
    kind = torch.randint(0, 12, (n,), generator=g)
    b = boxes.clone()
    b[kind == 1, 2] = b[kind == 1, 0]  # zero width
    b[kind == 2] = b[kind == 2][:, [2, 3, 0, 1]]  # inverted
    b[kind == 3, 1] = float("nan")
    b[kind == 4, 2] = float("inf")
    b[kind == 5, 0] = float("-inf")
    if n > 1:
        b[kind == 6] = b[0].clone()  # duplicates of box 0
    b[kind == 7] = torch.tensor([5.0, 5.0, 5.0, 5.0], dtype=torch.float64)  # identical points
    s = scores.clone()
    s[kind == 8] = 0.5  # ties
    s[kind == 9] = float("nan")
    s[kind == 10] = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0], dtype=torch.float64)[
        torch.randint(0, 4, (int((kind == 10).sum()),), generator=g)
    ]
    return b.to(dtype), s.to(dtype)


# A run in which no test passed has tested nothing (e.g. every test skipped because a backend
# failed to import): make it fail, so CI cannot go green by accident.
_PASSED = {"n": 0}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _PASSED["n"] += 1


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and session.testscollected and _PASSED["n"] == 0:
        session.exitstatus = 1
        print("\nERROR: no test passed (all skipped or deselected): nothing was tested")


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (restored afterwards): for tiny tensors one thread is
    fastest, and it is immune to OpenMP stalls when other work keeps the second core busy."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def randomize_bn(model, seed: int = 0):
    """Non-trivial BatchNorm statistics and affines (fresh ones would hide folding errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model


def flat_tensors(out):
    """The tensors of a (nested) model output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat_tensors(o)]
