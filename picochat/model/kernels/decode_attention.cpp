// Decode-step attention, one new query per row, on a bf16 K/V cache: fp32 queries (quantized models under
// the compiled step keep K/V in bf16: engine/kv_cache.py's cache_dtype), or bf16 queries (bf16 models under
// the compiled step), which round where single_query_attention's bf16 path rounds: q / sqrt(d_k), each
// score, each softmax weight and the output to bf16 (sums in fp32). Built with quant_vnni.cpp by
// picochat/model/vnni.py; model/attention.py's single_query_attention is the reference it is tested against.
//
//   y_r = softmax(q_r K^T / sqrt(d_k)) V      for the rep = nh / nkv query heads r that share K/V head g
//
// Why by hand: TorchInductor's loop for this reads the cache once per query head and per 16-lane chunk and
// runs the softmax in one thread (benchmarks/README.md); at 8 rows of 512 cached keys it took ~14 ms of a
// ~24 ms step. Here each (row, K/V head) is one task: its K rows are read once for all the group's query
// heads (scores in fp32), the softmax is vectorised, and V is read once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

inline __m512 bf16_to_fp32(const uint16_t* p) {  // 16 bf16 -> 16 fp32: the bf16 bits are the fp32's high half
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline float round_bf16(float x) {  // fp32 -> bf16 -> fp32, rounding as PyTorch's .to(bf16) does
  return static_cast<float>(c10::BFloat16(x));
}

// exp(x) for x <= 0 (scores minus their max): x = n ln2 + f, |f| <= ln2/2, exp(f) by its Taylor series to
// f^7 (relative error < 1e-7), times 2^n by vscalefps; x below -87 (and -inf, masked keys) gives exactly 0,
// NaN gives NaN (a NaN score makes its row NaN, as softmax does)
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: f exact
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);  // NaN stays NaN
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// one (row, K/V head): up to 4 of its query heads at a time; HC = d_k / 16 chunks of 16 lanes
// RB: round as the bf16 path does (scaled q, scores, weights; the caller rounds y)
template <int HC, bool RB>
void head_group(const float* q, int64_t rep, const uint16_t* k, const uint16_t* v, int64_t sk, int64_t sv,
                int64_t T, const bool* mask, int64_t smask, float* y, float* scores) {
  constexpr int D = HC * 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r0 = 0; r0 < rep; r0 += 4) {
    const int R = static_cast<int>(std::min<int64_t>(4, rep - r0));
    __m512 qv[4][HC];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < HC; ++c) {  // q / sqrt(d_k) first, as the Python reference scales q
        qv[r][c] = r < R ? _mm512_mul_ps(_mm512_loadu_ps(q + (r0 + r) * D + 16 * c), _mm512_set1_ps(scale))
                         : _mm512_setzero_ps();
        if (RB) {
          alignas(64) float t[16];
          _mm512_store_ps(t, qv[r][c]);
          for (float& e : t) e = round_bf16(e);
          qv[r][c] = _mm512_load_ps(t);
        }
      }
    float mx[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
    for (int64_t t = 0; t < T; ++t) {  // scores: each K row read once for the R heads
      if (mask && !mask[t * smask]) {
        for (int r = 0; r < R; ++r) scores[r * T + t] = neg_inf;
        continue;
      }
      __m512 kr[HC];
      for (int c = 0; c < HC; ++c) kr[c] = bf16_to_fp32(k + t * sk + 16 * c);
      for (int r = 0; r < R; ++r) {
        __m512 acc = _mm512_mul_ps(qv[r][0], kr[0]);
        for (int c = 1; c < HC; ++c) acc = _mm512_fmadd_ps(qv[r][c], kr[c], acc);
        const float s = RB ? round_bf16(_mm512_reduce_add_ps(acc)) : _mm512_reduce_add_ps(acc);
        scores[r * T + t] = s;
        mx[r] = s > mx[r] ? s : mx[r];  // (a NaN score is left out of the max; exp(NaN - max) is NaN)
      }
    }
    float inv[4];
    for (int r = 0; r < R; ++r) {  // softmax: exp(s - max), 16 at a time
      float* s = scores + r * T;
      __m512 sum = _mm512_setzero_ps();
      const __m512 m = _mm512_set1_ps(mx[r] == neg_inf ? 0.0f : mx[r]);
      int64_t t = 0;
      for (; t + 16 <= T; t += 16) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
      }
      if (t < T) {
        const __mmask16 tail = static_cast<__mmask16>((1u << (T - t)) - 1);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(neg_inf), tail, s + t), m));
        _mm512_mask_storeu_ps(s + t, tail, e);
        sum = _mm512_add_ps(sum, e);
      }
      const float total = _mm512_reduce_add_ps(sum);
      inv[r] = total > 0.0f ? 1.0f / total : std::numeric_limits<float>::quiet_NaN();  // all masked: NaN, as softmax
    }
    __m512 acc[4][HC];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < HC; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {  // the weighted sum: each V row read once
      __m512 vr[HC];
      for (int c = 0; c < HC; ++c) vr[c] = bf16_to_fp32(v + t * sv + 16 * c);
      for (int r = 0; r < R; ++r) {  // (RB: the weight itself, normalised and rounded, as softmax(...).to(bf16))
        const __m512 p = _mm512_set1_ps(RB ? round_bf16(scores[r * T + t] * inv[r]) : scores[r * T + t]);
        for (int c = 0; c < HC; ++c) acc[r][c] = _mm512_fmadd_ps(p, vr[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < HC; ++c)
        _mm512_storeu_ps(y + (r0 + r) * D + 16 * c, RB ? acc[r][c] : _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
  }
}

// q (B, nh, 1, d_k) fp32 or bf16; k, v (B, nkv, T_k, d_k) bf16 with unit stride on d_k (views of a longer
// cache); mask: (B, 1, 1, T_k) bool, True = may attend. -> (B, nh, 1, d_k) in q's dtype
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask) {
  const bool rb = q_in.scalar_type() == at::kBFloat16;
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && (q_in.scalar_type() == at::kFloat || rb),
              "decode_attention: q must be (B, nh, 1, d_k) float32 or bfloat16, got ", q_in.sizes(), " ",
              q_in.scalar_type());
  const at::Tensor q = q_in.to(at::kFloat).contiguous();  // (bf16 -> fp32 is exact)
  const int64_t B = q.size(0), nh = q.size(1), D = q.size(3), T = k.size(2), nkv = k.size(1);
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && k.dim() == 4 &&
                  v.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && nkv > 0 && nh % nkv == 0,
              "decode_attention: k and v must be (B, nkv, T_k, d_k) bfloat16 with nh a multiple of nkv, got ",
              k.sizes(), " ", v.sizes(), " for q ", q.sizes());
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && (D == 16 || D == 32 || D == 64 || D == 128),
              "decode_attention: d_k must be 16, 32, 64 or 128 and contiguous");
  const bool* m = nullptr;
  int64_t smb = 0, smt = 0;
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    TORCH_CHECK(mk.scalar_type() == at::kBool && mk.dim() == 4 && mk.size(1) == 1 && mk.size(2) == 1 &&
                    mk.size(3) == T && (mk.size(0) == B || mk.size(0) == 1),
                "decode_attention: mask must be (B, 1, 1, T_k) bool, got ", mk.sizes(), " ", mk.scalar_type());
    m = mk.data_ptr<bool>();
    smb = mk.size(0) == 1 ? 0 : mk.stride(0);
    smt = mk.stride(3);
  }
  at::Tensor y = at::empty({B, nh, 1, D}, q.options());
  if (B == 0 || nh == 0) return y.to(q_in.scalar_type());
  const int64_t rep = nh / nkv;
  const float* qp = q.data_ptr<float>();
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * nkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(std::min<int64_t>(rep, 4) * T);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nkv, g = i % nkv;
      const float* qi = qp + (b * nh + g * rep) * D;
      const uint16_t* ki = kp + b * k.stride(0) + g * k.stride(1);
      const uint16_t* vi = vp + b * v.stride(0) + g * v.stride(1);
      const bool* mi = m ? m + b * smb : nullptr;
      float* yi = yp + (b * nh + g * rep) * D;
      const int64_t sk = k.stride(2), sv = v.stride(2);
      float* sc = scores.data();
      switch (D * 2 + rb) {
        case 32: head_group<1, false>(qi, rep, ki, vi, sk, sv, T, mi, smt, yi, sc); break;
        case 33: head_group<1, true>(qi, rep, ki, vi, sk, sv, T, mi, smt, yi, sc); break;
        case 64: head_group<2, false>(qi, rep, ki, vi, sk, sv, T, mi, smt, yi, sc); break;
        case 65: head_group<2, true>(qi, rep, ki, vi, sk, sv, T, mi, smt, yi, sc); break;
        case 128: head_group<4, false>(qi, rep, ki, vi, sk, sv, T, mi, smt, yi, sc); break;
        case 129: head_group<4, true>(qi, rep, ki, vi, sk, sv, T, mi, smt, yi, sc); break;
        case 256: head_group<8, false>(qi, rep, ki, vi, sk, sv, T, mi, smt, yi, sc); break;
        default: head_group<8, true>(qi, rep, ki, vi, sk, sv, T, mi, smt, yi, sc); break;
      }
    }
  });
  return rb ? y.to(at::kBFloat16) : y;  // (round to nearest even, as .to(bf16) does in the reference)
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(picochat_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(picochat_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
