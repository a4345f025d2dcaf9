"""The CUDA text of the fused kernels compiles, by nvcc, to PTX for sm_90 with the options CuPy
compiles it with. No GPU is needed; the tests skip, saying why, where nvcc is absent.

The softmax cross-entropy kernel is a RawKernel: its source goes to the compiler as it is. The
elementwise bodies go through CuPy's ElementwiseKernel, which wraps them (cupy/_core/_kernel.pyx,
``_get_simple_elementwise_kernel`` and ``_get_elementwise_kernel``) as

    typedef float T;                       // from the arguments' dtypes
    <preamble>
    extern "C" __global__ void <name>(const CArray<float, 1, 1, 1> _raw_g, const float lr_t, ...,
                                      CArray<float, 1, 1, 1> _raw_p, ..., CIndexer<1> _ind) {
      ;
      CUPY_FOR(i, _ind.size()) {
        _ind.set(i);
        const T &g = _raw_g[_ind.get()];   // an input, by const reference
        T &p = _raw_p[_ind.get()];         // an output, by reference
        <body>;
      }
      ;
    }

``_cupy_wrapped`` writes the same, with plain pointers for CuPy's CArray (its headers come with
CuPy, not with the CUDA toolkit) and a grid-stride loop for CUPY_FOR.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from xpnet._fast_cupy import ELEMENTWISE, KERNELS, OPTIONS, PREAMBLE, softmax_xent_source

ARCH = "sm_90"
#: What CuPy adds to every compile, after our OPTIONS, in nvcc's spelling (the same words):
#: ``--std=c++14`` when no standard is given (cupy/_core/_compile_with_cache.pyx,
#: assemble_cupy_compiler_options) and ``-ftz=true`` (cupy/cuda/compiler.py, _compile_with_cache_cuda).
#: NVRTC 12+ also gets ``--device-as-default-execution-space``, which nvcc has no spelling for: it
#: changes only functions without an execution space, and every function here has one.
CUPY_ADDS = ("--std=c++14", "-ftz=true")
#: The arguments xpnet passes as scalars (host numbers, by value); the others are arrays.
SCALARS = {"lr_t", "c1", "c2", "eps_t"}
TYPES = ["float", "double"]


def _params(text: str) -> list[tuple[str, str]]:
    """(type, name) of each parameter of a CuPy in_params/out_params string, as CuPy parses it."""
    return [tuple(p.split()[-2:]) for p in text.split(",") if p.strip()]


def _cupy_wrapped(kernel: str, type_name: str) -> str:
    in_params, out_params, operation = ELEMENTWISE[kernel]
    declared, bound = [], []
    for (ctype, name), is_input in [(p, True) for p in _params(in_params)] + [(p, False) for p in _params(out_params)]:
        const = "const " if is_input else ""
        if name in SCALARS:  # a scalar argument: by value, with its C type
            declared.append(f"{const}{type_name} {name}")
        else:
            declared.append(f"{const}{type_name} *_raw_{name}")
            bound.append(f"{const}{ctype} &{name} = _raw_{name}[i];")
    lines = "\n    ".join(bound)
    return (
        f"typedef {type_name} T;\n{PREAMBLE}"
        f'extern "C" __global__ void {KERNELS[kernel][0]}({", ".join(declared)}, size_t n) {{\n'
        "  ;\n"
        "  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;"
        " i += (size_t)blockDim.x * gridDim.x) {\n"
        f"    {lines}\n    {operation};\n"
        "  }\n  ;\n}\n"
    )


def _source(kernel: str, type_name: str) -> str:
    return softmax_xent_source(type_name) if kernel == "softmax_xent" else _cupy_wrapped(kernel, type_name)


def _ptx(source: str, tmp_path, options=OPTIONS + CUPY_ADDS) -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (no CUDA toolkit here), so the CUDA text cannot be compiled to PTX")
    cu, ptx = tmp_path / "kernel.cu", tmp_path / "kernel.ptx"
    cu.write_text(source)
    command = [nvcc, "--ptx", f"-arch={ARCH}", *options, "--Werror", "all-warnings", str(cu), "-o", str(ptx)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    print(f"nvcc {time.perf_counter() - started:.2f} s: {' '.join(command[1:-3])}")
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}\n{source}"
    return ptx.read_text()


def _instructions(ptx: str) -> list[str]:
    """The PTX instructions' opcodes (mul.rn.ftz.f32, ...), without directives, labels or comments."""
    opcodes = []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if line and not line.startswith((".", "{", "}", "(", ")", "$")) and not line.endswith(":"):
            words = line.rstrip(";").split()
            opcodes.append(words[1] if words[0].startswith("@") else words[0])  # past a predicate
    return opcodes


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_each_kernel_compiles_to_ptx_for_sm_90(kernel, type_name, tmp_path):
    ptx = _ptx(_source(kernel, type_name), tmp_path)
    name = KERNELS[kernel][0]
    assert re.search(rf"^\.visible \.entry {name}\(", ptx, re.M), f"no entry point {name} in the PTX"
    assert ".target sm_90" in ptx
    arithmetic = [op for op in _instructions(ptx) if op.split(".")[0] in ("add", "sub", "mul", "div", "sqrt", "max")]
    other = ".f64" if type_name == "float" else ".f32"
    if kernel != "softmax_xent":  # (that kernel sums each row's loss in double on purpose)
        assert not [op for op in arithmetic if op.endswith(other)], f"{type_name} kernel computes in {other}"


@pytest.mark.parametrize("type_name", TYPES)
def test_the_adam_kernel_has_no_contracted_multiply_add(type_name, tmp_path):
    """--fmad=false reaches the compiler: no FMA in Adam, where the reference rounds the product
    and the sum apart. (Without the option nvcc contracts them: the assertion can fail.)"""
    source = _cupy_wrapped("adam", type_name)
    assert not [op for op in _instructions(_ptx(source, tmp_path)) if op.startswith("fma")]
    contracted = _ptx(source, tmp_path, options=CUPY_ADDS)
    assert [op for op in _instructions(contracted) if op.startswith("fma")]
