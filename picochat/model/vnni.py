"""int4 and int8 weights times activations rounded to int8, on AVX-512 VNNI: the decode matmuls of quantized models.

PyTorch's weight-only CPU kernels multiply in fp32 after dequantising each weight, so eight rows cost
~3x one (benchmarks/README.md, "Batch 8"). kernels/quant_vnni.cpp does what llama.cpp does with Q4_1 x Q8_1:
each row of x is rounded to int8 in blocks of 32 inputs, x_k ~= a_g Xq_k with a_g = max |x| / 127, and
one `vpdpbusd` multiplies 64 weight bytes by 64 activation bytes, each weight block unpacked once for up
to 8 rows:

    int4:  y_n = sum_g a_g (d_ng sum_k Xq_k Q_nk + m_ng sum_k Xq_k)      W = d Q + m per group of 32
    int8:  y_n = s_n sum_g a_g sum_k Xq_k Q_nk                           W = s Q per row

Rounding the activations is the one change of numbers against the weight-only kernels (a relative error of
at most 1/254 of a block's largest input; llama.cpp does the same for every quantized model).

The C++ source is compiled at first use with the compiler TorchInductor already needs, for this CPU, and
kept in `kernel_dir()`, keyed by the source, flags and PyTorch version (written atomically).
`available()` is False on CPUs without AVX-512 VNNI, without a compiler, or with PICOCHAT_VNNI=0; the
quantized layers then keep PyTorch's kernels (model/quant.py).
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

GROUP, TILE = 32, 16
LAYOUT_VERSION = 1  # raise it when pack_int4 / pack_int8 change: cached quantized models are keyed by it
SOURCES = [Path(__file__).parent / "kernels" / name for name in ("quant_vnni.cpp", "decode_attention.cpp")]
FLAGS = ["-O3", "-DNDEBUG", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq",
         "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]
_loaded = False  # set by available() once the library is in
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "f16c", "fma")


def cpu_has_vnni() -> bool:
    """This CPU has the instructions the kernels use (AVX-512 with VNNI; /proc/cpuinfo, so Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no build here
        return False
    line = next((l for l in info.splitlines() if l.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return all(f in have for f in _CPU_FLAGS)


def fits(n: int, k: int) -> bool:
    """The kernels take whole tiles of 16 outputs and groups of 32 inputs."""
    return n % TILE == 0 and k % GROUP == 0


@functools.cache
def available() -> bool:
    """The kernels are built (or were) and loaded: an x86 CPU with AVX-512 VNNI, a C++ compiler, and
    PICOCHAT_VNNI not set to 0. A failed build says why once, on stderr, and picochat goes on without."""
    if os.environ.get("PICOCHAT_VNNI", "1") == "0" or sys.platform != "linux" or not cpu_has_vnni():
        return False
    try:
        torch.ops.load_library(str(_build()))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        print(f"picochat: the VNNI int4/int8 kernels did not build ({detail.strip()[-400:]}); "
              "using PyTorch's kernels", file=sys.stderr)
        return False
    _register_fakes()
    global _loaded
    _loaded = True
    return True


def kernel_dir() -> Path:
    """Where built kernels live: $PICOCHAT_KERNELS, else beside TorchInductor's cache in the temp folder
    (one build per machine and user, whatever PICOCHAT_HOME a run uses; keyed by content, so shared safely)."""
    default = Path(tempfile.gettempdir()) / f"picochat_kernels_{os.getuid()}"
    return Path(os.environ.get("PICOCHAT_KERNELS") or default)


def _build() -> Path:
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX", "g++")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    key = hashlib.sha256("\n".join([*(p.read_text() for p in SOURCES), torch.__version__, cxx, abi, *FLAGS]).encode()).hexdigest()[:16]
    out = kernel_dir() / f"picochat_cpu-{key}.so"
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = out.parent.stat()  # code is loaded from here: a folder someone else owns or may write is refused
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{out.parent} is not a private folder of this user (set PICOCHAT_KERNELS elsewhere)")
    if out.exists():
        return out
    print("picochat: building the VNNI int4/int8 kernels for this CPU (once, ~10 s)", file=sys.stderr)
    lib = cpp_extension.library_paths()[0]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, renamed into place: atomic
        so = Path(tmp) / out.name
        cmd = [cxx, *FLAGS, abi, *[f"-I{p}" for p in cpp_extension.include_paths()], *map(str, SOURCES), "-o", str(so),
               f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(so, out)
    return out


def _register_fakes() -> None:
    # shapes for torch.compile: the ops run as opaque calls inside the compiled decode step
    @torch.library.register_fake("picochat_cpu::int4_linear")
    def _(x, packed, n):
        return x.new_empty(x.size(0), n)

    @torch.library.register_fake("picochat_cpu::int8_linear")
    def _(x, packed, scale, fine=False, margin=None):
        return x.new_empty(x.size(0), scale.size(0))

    @torch.library.register_fake("picochat_cpu::decode_attention")
    def _(q, k, v, mask):
        return q.new_empty(q.shape)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """(M, K) float32 x (N, K) int4 blocks -> (M, N) float32."""
    return torch.ops.picochat_cpu.int4_linear(x, packed, n)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, fine: bool = False,
                margin: Optional[float] = None) -> torch.Tensor:
    """(M, K) float32 x (N, K) int8 rows (scale: (N,) float32) -> (M, N) float32. fine: x rounded twice (x ~=
    a Xq + a' Xq', Xq' the rounding of the rest): ~1/254^2 of a block's range instead of 1/254, for the LM head.
    margin (>= 0, with fine): rounded twice only in the 16-output tiles whose largest once-rounded output is
    within `margin` of the row's largest (for logits: the tokens sampling picks from); the rest keep the first
    rounding. None or inf: every tile."""
    return torch.ops.picochat_cpu.int8_linear(x, packed, scale, fine, margin)


def decode_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    """decode_attention takes these: fp32 or bf16 queries on a bf16 cache on the CPU, one query per row, d_k
    of 16-128, a (B, 1, 1, T_k) bool mask or none; and the kernels are loaded (a flag, not available(): this
    runs while torch.compile traces the step; the compiled step asks available() before it traces)."""
    if not (_loaded and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == v.dtype == torch.bfloat16
            and q.device.type == "cpu"
            and q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and q.size(2) == 1):
        return False
    B, nh, _, d = q.shape
    nkv = k.size(1)
    return (d in (16, 32, 64, 128) and k.size(0) == B and k.size(3) == d and nkv > 0 and nh % nkv == 0
            and k.stride(-1) == 1 and v.stride(-1) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1)
                                  and mask.size(0) in (1, B) and mask.size(3) == k.size(2))))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """softmax(q K^T / sqrt(d_k)) V for one query per row: q (B, nh, 1, d_k) fp32 or bf16, k/v (B, nkv, T_k,
    d_k) bf16 (views of a cache), mask (B, 1, 1, T_k) bool or None -> (B, nh, 1, d_k) in q's dtype
    (kernels/decode_attention.cpp; bf16 q rounds as single_query_attention's bf16 path: q / sqrt(d_k), the
    scores, the weights and the output, sums in fp32)."""
    return torch.ops.picochat_cpu.decode_attention(q, k, v, mask)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Q (N, K) in 0..15, scale and minimum (N, K/32) with W = Q scale + minimum -> (N/16, K/32, 320) uint8
    blocks of quant_vnni.cpp's int4 layout (scale and minimum rounded to fp16, as Q4_1 keeps them)."""
    N, K = q.shape
    t, g = N // TILE, K // GROUP
    # (tile, lane, group, pair p, half h, 4) -> (tile, group, p, lane, 4, half): low nibble h=0 = quad 2p
    q = q.to(torch.uint8).view(t, TILE, g, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    nibbles = (q[..., 0] | (q[..., 1] << 4)).reshape(t, g, 256)
    def per_lane(v):  # (N, K/32) -> (tile, group, 32 bytes): 16 fp16 values, lane order
        return v.to(torch.float16).view(t, TILE, g).transpose(1, 2).contiguous().view(torch.uint8)
    return torch.cat([nibbles, per_lane(scale), per_lane(minimum)], dim=-1).contiguous()


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_int4's inverse: Q (N, K) uint8, scale and minimum (N, K/32) float32."""
    t, g = n // TILE, k // GROUP
    b = packed.view(t, g, 320)
    nib = b[..., :256].reshape(t, g, 4, TILE, 4)
    q = torch.stack([nib & 15, nib >> 4], dim=-1)  # (tile, group, p, lane, 4, half)
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(n, k)
    def lanes(v):  # (tile, group, 32 bytes) -> (N, K/32)
        return v.contiguous().view(torch.float16).float().transpose(1, 2).reshape(n, g)
    return q, lanes(b[..., 256:288]), lanes(b[..., 288:320])


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """Q (N, K) int8 -> (N/16, K/32, 512) uint8 blocks of quant_vnni.cpp's int8 layout, U = Q + 128."""
    N, K = q.shape
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    return u.view(N // TILE, TILE, K // GROUP, 8, 4).permute(0, 2, 3, 1, 4).reshape(N // TILE, K // GROUP, 512).contiguous()


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """pack_int8's inverse: Q (N, K) int8."""
    u = packed.view(n // TILE, k // GROUP, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(n, k)
    return (u.to(torch.int16) - 128).to(torch.int8)
