// Weight-only int4 / int8 matrix products for decoding on CPUs with AVX-512 VNNI, built at first use by
// picochat/model/vnni.py. Why by hand: PyTorch's CPU kernels (_weight_int4pack_mm_for_cpu,
// _weight_int8pack_mm) dequantise the weights to floats and multiply in fp32, so their time grows ~3x from
// one row to eight (benchmarks/README.md, "Batch 8"): at eight rows they are bound by fp32 arithmetic, not by
// reading the weights. Here, as in llama.cpp's Q4_1 x Q8_1 dot product, each row of x is rounded to int8
// in blocks of 32 (one scale each), and one VNNI instruction (vpdpbusd) multiplies 64 weight bytes by
// 64 activation bytes and sums them in fours into 16 int32 lanes: 4x the work of an fp32 FMA, and each
// weight block is loaded and unpacked once for up to 8 rows.
//
// Layouts (made by vnni.py's pack_int4 / pack_int8), per tile of 16 output channels n0..n0+15 and group of
// 32 inputs k0..k0+31, one block; lane j of a 64-byte vector holds channel n0+j, bytes 4j..4j+3 hold
// four consecutive inputs ("quad" q = inputs k0+4q..k0+4q+3):
//   int4: 4 x 64 bytes, low nibbles quad 2p and high nibbles quad 2p+1 (p = 0..3), values Q in 0..15;
//         then 16 fp16 scales d and 16 fp16 minima m: W = d Q + m (llama.cpp's Q4_1). 320 bytes.
//   int8: 8 x 64 bytes, quad q, stored as U = Q + 128 in 0..255 (vpdpbusd multiplies unsigned by
//         signed bytes); W = s (U - 128) with one fp32 scale s per channel, kept apart. 512 bytes.
// Activations: x_k ~= a_g Xq_k with a_g = max_k |x_k| / 127 over the group, Xq_k in -127..127. Then per
// group sum_k x_k W_k ~= a_g (d sum_k Xq_k Q_k + m sum_k Xq_k) for int4, a_g s (sum_k Xq_k U_k - 128 sum_k Xq_k)
// for int8.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

namespace {

constexpr int64_t G = 32;     // inputs per group
constexpr int64_t TILE = 16;  // output channels per tile (one zmm of fp32)
constexpr int64_t MB = 8;     // rows per pass over a tile's weights
constexpr int64_t Q4_BLOCK = 320, Q8_BLOCK = 512;

// x (M, K) fp32 -> xq (M, K) int8, a (M, K/G) block scales, as (M, K/G) = a * sum(xq) of the block
// (serial: a few thousand values; a parallel region here costs more than it saves at 8 rows)
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* a, float* as) {
  const int64_t groups = K / G;
  for (int64_t i = 0; i < M * groups; ++i) {
    const int64_t m = i / groups, g = i % groups;
    const float* src = x + m * K + g * G;
    __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));  // round to nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + g * G), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + g * G + 16), _mm512_cvtsepi32_epi8(q1));
    // a NaN input (max drops it, and it rounds to INT_MIN) must reach the output as NaN, as in a float matmul
    const bool nan = (_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q)) != 0;
    a[i] = nan ? std::numeric_limits<float>::quiet_NaN() : scale;
    as[i] = a[i] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
  }
}

inline int32_t quad(const int8_t* p) {  // four activation bytes as one int32 for vpbroadcastd
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// the register block: s[r] += w . (row r's four activation bytes at xq + r K + off) for every row, so one
// weight vector meets all R rows and their sums are R independent vpdpbusd chains (one chain per row, as
// before, left the unit waiting on its latency)
template <int R>
inline void dot_rows(__m512i* s, __m512i w, const int8_t* xq, int64_t K, int64_t off) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) s[r] = _mm512_dpbusd_epi32(s[r], w, _mm512_set1_epi32(quad(xq + r * K + off)));
}

// chains per row: vpdpbusd waits ~4 cycles for its accumulator, so a block of fewer than 4 rows splits each
// row's sum over C accumulators (quad q into chain q % C) and adds them at the group's end: int32 sums, so
// exact, the same outputs whatever C. One chain a row left one or two rows latency-bound (benchmarks/README.md,
// "ninth session")
template <int R>
constexpr int chains() { return R >= 4 ? 1 : (R == 1 ? 4 : 2); }

template <int R, int C>
inline void fold_chains(__m512i* s) {
#pragma GCC unroll 8
  for (int c = 1; c < C; ++c)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) s[r] = _mm512_add_epi32(s[r], s[c * R + r]);
}

// rows m0..m0+R-1 (R <= MB) of y's tile at channel n0, from the int4 blocks of that tile
template <int R>
inline void q4_tile(const uint8_t* blocks, int64_t groups, const int8_t* xq, const float* a, const float* as,
                    int64_t K, float* y, int64_t N) {
  constexpr int C = chains<R>();
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = blocks + g * Q4_BLOCK;
    __m512i s[R * C];
#pragma GCC unroll 16
    for (int r = 0; r < R * C; ++r) s[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512i v = _mm512_loadu_si512(b + 64 * p);
      const __m512i w0 = _mm512_and_si512(v, low), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      dot_rows<R>(s + (2 * p) % C * R, w0, xq, K, g * G + 8 * p);          // quad 2p
      dot_rows<R>(s + (2 * p + 1) % C * R, w1, xq, K, g * G + 8 * p + 4);  // quad 2p + 1
    }
    fold_chains<R, C>(s);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 256)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 288)));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t ag = r * (K / G) + g;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), _mm512_mul_ps(d, _mm512_set1_ps(a[ag])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(as[ag]), acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * N, acc[r]);
}

// int8: as int4 without the unpacking; the -128 offset's sum_k a Xq per row is the same for every tile,
// so linear() computes it once (asum) instead of each tile adding it up again
template <int R>
inline void q8_tile(const uint8_t* blocks, int64_t groups, const int8_t* xq, const float* a, const float* asum,
                    int64_t K, const float* scale, float* y, int64_t N) {
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  constexpr int C = chains<R>();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = blocks + g * Q8_BLOCK;
    __m512i s[R * C];
#pragma GCC unroll 16
    for (int r = 0; r < R * C; ++r) s[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) dot_rows<R>(s + q % C * R, _mm512_loadu_si512(b + 64 * q), xq, K, g * G + 4 * q);
    fold_chains<R, C>(s);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), _mm512_set1_ps(a[r * (K / G) + g]), acc[r]);
  }
  const __m512 sc = _mm512_loadu_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)  // s (sum a Xq U - 128 sum a Xq)
    _mm512_storeu_ps(y + r * N, _mm512_mul_ps(sc, _mm512_sub_ps(acc[r], _mm512_set1_ps(128.0f * asum[r]))));
}

// one tile, every row, in passes of at most MB rows (the tile's weights stay in L1 between passes)
template <bool FOUR>
void tile_all_rows(const uint8_t* blocks, int64_t groups, const int8_t* xq, const float* a, const float* as,
                   int64_t M, int64_t K, const float* scale, float* y, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t rows = std::min<int64_t>(MB, M - m0);
    const int8_t* x = xq + m0 * K;
    // aux: the int4 minima's per-group sums a sum(Xq), or int8's per-row sum over the groups
    const float *am = a + m0 * (K / G), *asm_ = FOUR ? as + m0 * (K / G) : as + m0;
    float* out = y + m0 * N;
#define PICOCHAT_ROWS(R)                                                              \
  case R:                                                                             \
    if constexpr (FOUR) q4_tile<R>(blocks, groups, x, am, asm_, K, out, N);           \
    else q8_tile<R>(blocks, groups, x, am, asm_, K, scale, out, N);                   \
    break;
    switch (rows) {
      PICOCHAT_ROWS(1) PICOCHAT_ROWS(2) PICOCHAT_ROWS(3) PICOCHAT_ROWS(4)
      PICOCHAT_ROWS(5) PICOCHAT_ROWS(6) PICOCHAT_ROWS(7) PICOCHAT_ROWS(8)
    }
#undef PICOCHAT_ROWS
  }
}

// The LM head's second rounding (linear's `fine`), tile by tile right after the first pass over the tile,
// while its weights are still in L1 (a second pass over the head afterwards re-read most of it from memory).
// With a margin, only tiles within `margin` of their row's largest output need it; the row's largest is
// known only at the end, so each row's running largest, shared by the threads, picks a superset (SmolLM2's
// head over 512 positions: 9.9% of the tiles for the 8.5% needed) whose once-rounded outputs are kept, and
// put_back() returns those that fell below the final threshold to them: the outputs do not depend on the
// threads' timing.
struct Saved {
  int64_t m, t;
  float top;  // the tile's largest once-rounded output in row m
  float v[TILE];
};

struct Refine {
  const int8_t* xq;  // (M, K) the second rounding's rows; a (M, K/G) their scales, aux (M) their sums
  const float *a, *aux;
  bool limited;  // a margin was given (else every tile, and top/margin are unused)
  float margin;
  std::atomic<float>* top;  // (M) each row's largest once-rounded output seen so far
};

constexpr int64_t CHUNK = 32;  // tiles a thread takes at a time from the shared counter (with a margin)

// rows: the rows of tile t to refine; scratch: TILE floats a row, and with a margin room to gather the rows
// (K bytes, K/G + 1 floats each)
void refine_tile(const uint8_t* blocks, int64_t groups, int64_t M, int64_t K, const float* scale, float* y, int64_t N,
                 int64_t t, const Refine& f, std::vector<int64_t>& rows, std::vector<float>& scratch,
                 std::vector<Saved>& saved) {
  rows.clear();
  for (int64_t m = 0; m < M; ++m) {
    if (f.limited) {
      const float tmax = _mm512_reduce_max_ps(_mm512_loadu_ps(y + m * N));
      float seen = f.top[m].load(std::memory_order_relaxed);
      while (tmax > seen && !f.top[m].compare_exchange_weak(seen, tmax, std::memory_order_relaxed)) {
      }
      if (!(tmax >= std::max(seen, tmax) - f.margin)) continue;  // a NaN row (all NaN) stays as it is
      saved.push_back(Saved{m, t, tmax, {}});
      _mm512_storeu_ps(saved.back().v, _mm512_loadu_ps(y + m * N));
    }
    rows.push_back(m);
  }
  const int64_t n = rows.size();
  if (n == 0) return;
  float* add = scratch.data();
  const int8_t* xr = f.xq;  // every row: they are already side by side; else gathered into the scratch
  const float *ar = f.a, *auxr = f.aux;
  if (n < M) {
    float* ag = add + M * TILE;
    float* auxg = ag + M * groups;
    int8_t* xg = reinterpret_cast<int8_t*>(auxg + M);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(xg + i * K, f.xq + rows[i] * K, K);
      std::memcpy(ag + i * groups, f.a + rows[i] * groups, groups * sizeof(float));
      auxg[i] = f.aux[rows[i]];
    }
    xr = xg;
    ar = ag;
    auxr = auxg;
  }
  tile_all_rows<false>(blocks, groups, xr, ar, auxr, n, K, scale, add, TILE);
  for (int64_t i = 0; i < n; ++i) {
    float* yr = y + rows[i] * N;
    _mm512_storeu_ps(yr, _mm512_add_ps(_mm512_loadu_ps(yr), _mm512_loadu_ps(add + i * TILE)));
  }
}

void put_back(const std::vector<std::vector<Saved>>& saved, const Refine& f, float* y, int64_t N) {
  for (const auto& mine : saved)
    for (const Saved& s : mine)
      if (s.top < f.top[s.m].load(std::memory_order_relaxed) - f.margin)
        _mm512_storeu_ps(y + s.m * N + s.t * TILE, _mm512_loadu_ps(s.v));
}

template <bool FOUR>
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t N, bool fine,
                  std::optional<double> margin) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "quant_vnni: x must be a contiguous (M, K) float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), groups = K / G, tiles = N / TILE;
  TORCH_CHECK(K % G == 0 && N % TILE == 0, "quant_vnni: K must be a multiple of 32 and N of 16, got K=", K, " N=", N);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == tiles * groups * (FOUR ? Q4_BLOCK : Q8_BLOCK),
              "quant_vnni: packed weights do not match x's width ", K, " and N=", N);
  if (!FOUR)
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(),
                "quant_vnni: int8 needs N float32 scales");
  TORCH_CHECK(!margin || (fine && *margin >= 0), "quant_vnni: margin needs fine=True and a value >= 0, got ",
              margin ? *margin : 0.0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // fine: each row rounded twice, x ~= a Xq + a' Xq' with Xq' the rounding of x - a Xq (error ~1/254^2 of
  // a block's largest input, finer than bf16): rows M+m of xq hold the second rounding of row m. For the LM
  // head, whose every output is a logit (model/quant.py). margin: the second rounding only in the 16-output
  // tiles holding an output within `margin` of its row's largest (once-rounded): logits further down keep
  // the first rounding (off by up to ~0.5 nats on SmolLM2, at e^-margin of the top token's probability or
  // less), and most tiles skip the second rounding's arithmetic (benchmarks/README.md, "ninth session")
  const int64_t R = fine ? 2 * M : M;
  std::vector<int8_t> xq(R * K);
  std::vector<float> a(R * groups), as(R * groups);
  const float* xp = x.data_ptr<float>();
  quantize_rows(xp, M, K, xq.data(), a.data(), as.data());
  if (fine) {
    std::vector<float> rest(M * K);
    for (int64_t k = 0; k < M * K; ++k) rest[k] = xp[k] - a[k / G] * static_cast<float>(xq[k]);
    quantize_rows(rest.data(), M, K, xq.data() + M * K, a.data() + M * groups, as.data() + M * groups);
  }
  std::vector<float> asum(FOUR ? 0 : R);  // int8 needs only each row's total of a sum(Xq), the same for every tile
  for (int64_t r = 0; r < static_cast<int64_t>(asum.size()); ++r)
    for (int64_t g = 0; g < groups; ++g) asum[r] += as[r * groups + g];
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* s = FOUR ? nullptr : scale.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t block = FOUR ? Q4_BLOCK : Q8_BLOCK;
  const bool limited = fine && margin && !std::isinf(*margin);  // (+inf: every tile, as no margin)
  std::vector<std::atomic<float>> top(limited ? M : 0);
  for (auto& v : top) v.store(-std::numeric_limits<float>::infinity());
  const Refine f{xq.data() + M * K, a.data() + M * groups, asum.data() + (fine ? M : 0), limited,
                 limited ? static_cast<float>(*margin) : 0.0f, top.data()};
  std::vector<std::vector<Saved>> saved;  // each thread's, moved in at its end
  std::mutex saved_lock;
  // with a margin the second rounding's work crowds the low tile ids (a BPE vocabulary's likely tokens), so
  // a thread given the first half of the tiles did most of it while the other waited: the threads take
  // runs of CHUNK tiles in order from a shared counter instead (any order gives the same outputs)
  const int64_t chunks = (tiles + CHUNK - 1) / CHUNK;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, limited ? std::max(1, at::get_num_threads()) : tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows;
    std::vector<float> scratch(!fine ? 0 : limited ? M * (TILE + groups + 1) + (M * K + 3) / 4 : M * TILE);
    std::vector<Saved> mine;
    auto run = [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* bt = w + t * groups * block;
        tile_all_rows<FOUR>(bt, groups, xq.data(), a.data(), FOUR ? as.data() : asum.data(), M, K,
                            FOUR ? nullptr : s + t * TILE, out + t * TILE, N);
        if (fine) refine_tile(bt, groups, M, K, s + t * TILE, out + t * TILE, N, t, f, rows, scratch, mine);
      }
    };
    if (!limited) {
      run(begin, end);
    } else {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
        run(c * CHUNK, std::min(tiles, (c + 1) * CHUNK));
    }
    if (!mine.empty()) {
      std::lock_guard<std::mutex> hold(saved_lock);
      saved.push_back(std::move(mine));
    }
  });
  if (limited) put_back(saved, f, out, N);
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  return linear<true>(x, packed, packed, N, false, std::nullopt);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, bool fine,
                       std::optional<double> margin) {
  return linear<false>(x, packed, scale, scale.numel(), fine, margin);
}

}  // namespace

TORCH_LIBRARY(picochat_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scale, bool fine=False, float? margin=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(picochat_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}
