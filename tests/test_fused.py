"""Backend choice and the torch path of the fused masked ops; runs the Triton kernels under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixshare_layers import CutMixMixer, Unmixer
from mixshare_layers.functional import backend as backend_mod
from mixshare_layers.functional import mix, mix_reference, sample_mix_params, unmix_pool, unmix_pool_reference
from mixshare_layers.functional.backend import ENV_VAR, resolve_backend, use_triton

ROOT = Path(__file__).resolve().parents[1]


def _info(b=3, m=2, h=8, w=8, seed=0, dtype=torch.float64):
    return sample_mix_params(b, m, h, w, cutmix_prob=1.0, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# -- backend choice ------------------------------------------------------------------------------------------------
def test_resolve_backend_names_and_env(monkeypatch):
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") == "auto"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(None) == "torch"
    assert CutMixMixer(2).backend == "torch" and Unmixer().backend == "torch"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of 'auto', 'torch', 'triton', but got 'cuda'"):
        resolve_backend(None)
    monkeypatch.delenv(ENV_VAR)
    assert resolve_backend(None) == "auto"


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton', but got 'fused'"):
        CutMixMixer(2, backend="fused")
    with pytest.raises(ValueError, match="backend must be one of"):
        Unmixer(backend="TRITON")


def test_auto_and_torch_use_torch_on_cpu():
    x = torch.zeros(2)
    assert not use_triton("torch", x)
    assert not use_triton("auto", x)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs Triton on the CPU")
def test_triton_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors, but got a tensor on cpu"):
        use_triton("triton", torch.zeros(2))


def test_triton_backend_without_triton(monkeypatch):
    monkeypatch.setattr(backend_mod, "_TRITON_STATE", {"ok": False})
    with pytest.raises(ImportError, match=r"pip install mixshare-layers\[triton\]"):
        resolve_backend("triton")


def test_import_does_not_import_triton():
    code = "import sys, mixshare_layers, mixshare_layers.deploy; print('triton' in sys.modules)"
    env = {**os.environ, ENV_VAR: "auto"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert res.stdout.strip() == "False"


# -- torch path --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_torch_mix_matches_reference_at_other_resolutions(m):
    info = _info(b=2, m=m, h=12, w=10, seed=m)
    g = torch.Generator().manual_seed(1)
    info = info._replace(inside=torch.rand(2, m, dtype=torch.float64, generator=g))  # arbitrary compositions
    e = torch.randn(2, m, 3, 5, 7, dtype=torch.float64, requires_grad=True)  # coarser grid: fractional coverage
    torch.testing.assert_close(mix(e, info, 1.5, backend="torch"), mix_reference(e, info, 1.5))
    assert torch.autograd.gradcheck(lambda e: mix(e, info, 1.5, backend="torch"), (e,))


@pytest.mark.parametrize(("strength", "num_unmixed", "normalize"), [(0.0, None, True), (0.4, 2, False), (1.0, 5, True)])
def test_torch_unmix_gradcheck(strength, num_unmixed, normalize):
    info = _info(b=2, m=3, h=9, w=7, seed=3)
    f = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    kw = {"strength": strength, "num_unmixed": num_unmixed, "normalize": normalize}
    torch.testing.assert_close(unmix_pool(f, info, backend="torch", **kw), unmix_pool_reference(f, info, **kw))
    assert torch.autograd.gradcheck(lambda f: unmix_pool(f, info, backend="torch", **kw), (f,))


def test_torch_path_layouts_and_dtypes():
    info = _info(b=2, m=2, h=6, w=6)
    e = torch.randn(2, 2, 4, 6, 6, dtype=torch.float64)
    ref = mix_reference(e, info)
    e_cl = e.reshape(4, 4, 6, 6).contiguous(memory_format=torch.channels_last).view(2, 2, 4, 6, 6)
    torch.testing.assert_close(mix(e_cl, info, backend="torch"), ref)
    torch.testing.assert_close(mix(e.transpose(-1, -2).contiguous().transpose(-1, -2), info, backend="torch"), ref)
    out = mix(e.to(torch.bfloat16), info.to(dtype=torch.float32), backend="torch")
    assert out.dtype == torch.bfloat16
    ref_bf = mix_reference(e.to(torch.bfloat16).double(), info)
    torch.testing.assert_close(out.double(), ref_bf, rtol=1e-2, atol=1e-2)

    f = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    ref = unmix_pool_reference(f, info)
    torch.testing.assert_close(unmix_pool(f.contiguous(memory_format=torch.channels_last), info), ref)
    f_bf = f.to(torch.bfloat16).requires_grad_(True)
    pooled = unmix_pool(f_bf, info.to(dtype=torch.float32), backend="torch")
    assert pooled.dtype == torch.bfloat16
    pooled.float().sum().backward()
    assert f_bf.grad is not None and f_bf.grad.dtype == torch.bfloat16


def test_torch_path_compiles_without_graph_breaks():
    torch._dynamo.reset()
    mixer = CutMixMixer(2, backend="torch")
    unmixer = Unmixer("partial", backend="torch")
    info = _info(b=2, m=2, h=8, w=8, dtype=torch.float32)

    def step(e):
        return unmixer(mixer.apply(e, info), info).square().sum()

    e = torch.randn(2, 2, 6, 8, 8, requires_grad=True)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(e)
    (grad,) = torch.autograd.grad(got, e)
    e2 = e.detach().clone().requires_grad_(True)
    want = step(e2)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, e2.grad)


def test_mixer_and_unmixer_repr_show_backend():
    assert "backend='torch'" in repr(CutMixMixer(2, backend="torch"))
    assert "backend='torch'" in repr(Unmixer("full", backend="torch"))


# -- the Triton kernels, under the interpreter ---------------------------------------------------------------------
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU is here: tests/test_fused_triton.py runs the compiled kernels on it (the interpreter run is for "
    "CPU-only machines such as CI; under Triton 3.6's interpreter on a GPU machine the unmix cases disagreed while "
    "the same kernels passed on the GPU, see docs/benchmarks.md)",
)
def test_triton_kernels_under_interpreter():
    """Runs tests/test_fused_triton.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported)."""
    pytest.importorskip("numpy")
    if subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0:
        pytest.skip("triton is not installed (extra: mixshare-layers[triton])")
    env = {**os.environ, "TRITON_INTERPRET": "1", ENV_VAR: "auto", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_fused_triton.py")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], tail


# -- every Triton kernel compiles for a real GPU (ahead of time: no GPU needed) --------------------------------------
def _aot_cases():
    """(kernel name, pointer dtypes, scalar types, constexprs) covering each kernel, incl. maps of 1 x 1 cells (an
    integer argument equal to 1 is specialised into a constant by Triton's JIT) and float64."""
    f32, f64, i64 = "*fp32", "*fp64", "*i64"
    cases = []
    for acc, p in (("float32", f32), ("float64", f64)):
        for hw in (None, 1):
            sizes = {"H": "i32", "W": "i32"} if hw is None else {"H": ("constexpr", 1), "W": ("constexpr", 1)}
            common = {"C": "i32", "NH": "i32", "NW": "i32", **sizes}
            cases += [
                ("mix_fwd_kernel", {"e_ptr": p, "box_ptr": i64, "in_ptr": p, "out_ptr": p, "o_ptr": p, "scale": "fp32",
                                    "s_b": "i32", "s_m": "i32", "s_c": "i32", "s_y": "i32", "s_x": "i32", **common},
                 {"M": 3, "BLOCK_Y": 32, "BLOCK_X": 64, "ACC": acc}),
                ("mix_bwd_kernel", {"g_ptr": p, "box_ptr": i64, "in_ptr": p, "out_ptr": p, "ge_ptr": p, "scale": "fp32",
                                    "s_b": "i32", "s_c": "i32", "s_y": "i32", "s_x": "i32", **common},
                 {"M": 2, "BLOCK_Y": 16, "BLOCK_X": 128, "ACC": acc}),
                ("unmix_pool_fwd_kernel", {"f_ptr": p, "box_ptr": i64, "in_ptr": p, "out_ptr": p, "r_ptr": p,
                                           "pooled_ptr": p, "num_unmixed": "i32", "s_b": "i32", "s_c": "i32",
                                           "s_y": "i32", "s_x": "i32", **common},
                 {"M": 2, "HAS_R": True, "NORMALIZE": True, "BLOCK_C": 4, "BLOCK_Y": 16, "BLOCK_X": 32, "ACC": acc}),
                ("unmix_pool_bwd_kernel", {"gp_ptr": p, "box_ptr": i64, "in_ptr": p, "out_ptr": p, "r_ptr": p,
                                           "gf_ptr": p, "num_unmixed": "i32", **common},
                 {"M": 3, "HAS_R": False, "NORMALIZE": False, "BLOCK_C": 4, "BLOCK_Y": 16, "BLOCK_X": 32, "ACC": acc}),
                ("finish_mix_kernel", {"lam_ptr": p, "owner_ptr": i64, "pixel_ptr": i64, "coin_ptr": f32,
                                       "prob_ptr": f32, "prob_value": "fp32", "boxes_ptr": i64, "inside_ptr": p,
                                       "outside_ptr": p, "ratios_ptr": p, "cut_ptr": "*i1", "B": "i32", **sizes},
                 {"M": 3, "BLOCK_B": 64, "BLOCK_M": 4, "PROB_IN_MEMORY": hw is None, "WORK": acc}),
            ]  # fmt: skip
    return cases


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the CUDA tests compile and run the kernels")
def test_triton_kernels_compile_for_a_gpu():
    """Lower every kernel to a cubin for sm_90 with Triton's own toolchain, so a kernel that only the GPU compiler
    rejects (shape or type errors the interpreter lets through) fails here, in CI, without a GPU."""
    code = r"""
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixshare_layers.functional._triton import kernels
sys.path.insert(0, sys.argv[1])
from test_fused import _aot_cases
failed = []
for name, sig, consts in _aot_cases():
    fn = getattr(kernels, name)
    signature, constexprs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        value = consts.get(arg, sig.get(arg))
        assert value is not None, (name, arg)
        if arg in consts or isinstance(value, tuple):
            signature[arg] = "constexpr"
            v = value[1] if isinstance(value, tuple) else value
            constexprs[(i,)] = getattr(tl, v) if isinstance(v, str) else v
        else:
            signature[arg] = value
    try:
        triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    except Exception as exc:
        failed.append(f"{name} {consts}: {type(exc).__name__}: {str(exc)[:2000]}")
print("\n".join(failed) if failed else "all compiled")
sys.exit(1 if failed else 0)
"""
    if subprocess.run([sys.executable, "-c", "import triton.compiler"], capture_output=True).returncode != 0:
        pytest.skip("triton is not installed (extra: mixshare-layers[triton])")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
