"""The CPU kernels' threading: torch's OpenMP threads when torch runs on OpenMP, else effops's
pool; both give the same results, a forked child works, and a bad setting is a clear error."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from effops import _backend

# A script that prints a digest of several multi-threaded kernels' outputs.
_DIGEST = textwrap.dedent("""
    import hashlib, torch, effops
    from effops.ops import dwsep_conv, nms, weighted_fuse
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(4, 32, 40, 40, generator=g).contiguous(memory_format=cl)
    y = dwsep_conv(x, torch.randn(32, 1, 3, 3, generator=g), torch.randn(48, 32, 1, 1, generator=g))
    f = weighted_fuse([x, torch.randn(4, 32, 20, 20, generator=g), torch.randn(4, 32, 80, 80, generator=g)],
                      torch.rand(3, generator=g), resample=["identity", "nearest", "maxpool"])
    b = torch.rand(3000, 2, generator=g) * 300
    k = nms(torch.cat([b, b + 5 + torch.rand(3000, 2, generator=g) * 60], 1), torch.rand(3000, generator=g), 0.5)
    h = hashlib.sha256()
    for t in (y, f, k):
        h.update(t.contiguous().numpy().tobytes())
    print(effops._backend._C.parallel_runtime().split(":")[0], h.hexdigest())
""")


def _run(code, **env):
    e = dict(os.environ, **env)
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    return r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP hand-over is Linux-only")
def test_openmp_and_pool_give_identical_results():
    omp = _run(_DIGEST, EFFOPS_PARALLEL="auto")
    pool = _run(_DIGEST, EFFOPS_PARALLEL="pool")
    assert omp.returncode == 0, omp.stderr
    assert pool.returncode == 0, pool.stderr
    mode_omp, digest_omp = omp.stdout.split()
    mode_pool, digest_pool = pool.stdout.split()
    assert mode_pool == "pool"
    if _backend.torch_openmp_runtime() is not None:
        assert mode_omp == "openmp"
    assert digest_omp == digest_pool


def test_runtime_reported_in_info():
    info = _backend.build_info()["cpu"]
    assert info["threads"] == _backend.PARALLEL
    expect = "pool" if _backend.torch_openmp_runtime() is None else "torch's OpenMP threads"
    if os.environ.get("EFFOPS_PARALLEL", "auto") in ("auto", "openmp"):
        assert _backend.PARALLEL.startswith(expect)


def test_bad_setting_is_a_clear_error():
    r = _run("import effops", EFFOPS_PARALLEL="threads")
    assert r.returncode != 0
    assert "EFFOPS_PARALLEL='threads': expected auto, openmp or pool" in r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_runs_kernels():
    """After fork the child has none of the parent's worker threads: it falls back to a fresh
    pool and still computes the same answer. (torch's own multi-threaded ops hang in such a
    child - GNU OpenMP is not fork-safe - so the child runs only effops kernels, on
    channels_last inputs that need no torch copy, and compares with numpy.)"""
    code = textwrap.dedent("""
        import os, torch, effops
        from effops.ops import weighted_fuse
        torch.set_num_threads(2)
        xs = [torch.randn(2, 16, 64, 64).contiguous(memory_format=torch.channels_last) for _ in range(2)]
        w = torch.rand(2)
        ref = weighted_fuse(xs, w, resample=["identity", "identity"]).numpy().tobytes()
        pid = os.fork()
        if pid == 0:
            ok = weighted_fuse(xs, w, resample=["identity", "identity"]).numpy().tobytes() == ref
            ok = ok and effops._backend._C.parallel_runtime() == "pool"
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
