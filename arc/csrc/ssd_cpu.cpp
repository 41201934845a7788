// The Mamba2 ops on a CPU, built on first use by arc/cpu_scan.py (torch.utils.cpp_extension): the
// scan as the plain recurrence, forward and backward, in one pass over the sequence per (batch row,
// head); the causal depthwise conv + SiLU and the gated RMSNorm, forward and backward; and one
// decoding steps of the whole mixer between in_proj and out_proj (one token: mixer_step_; T tokens
// from the states, left unchanged: mixer_extend; the states advanced by a count per sequence:
// mixer_commit_). The scan:
//
//   s_t = exp(dt_t * A) s_{t-1} + (dt_t x_t) B_t^T        s: (p, n) per head, s_{-1} = initial state
//   y_t = s_t C_t
//
// Why the recurrence and not the chunked matrix form: at ARC's lengths (0.5k-2k tokens) and this
// model's sizes (p = n = 64) both cost about p * n multiply-adds per token and head, but the
// recurrence keeps one head's state (16 KiB in float32) in the L1 cache for the whole sequence,
// where the chunked form streams (chunk x chunk) and (p x n) matrices through memory in many
// separate passes. Every inner loop runs over the state's n entries: contiguous, vectorised.
//
// Shapes (all contiguous, one dtype, float32 or float64): x (b, l, h, p), dt (b, l, h) after
// softplus, A (h,), B and C (b, l, g, n), state (b, h, p, n). Heads h are split evenly over the
// groups g (head i reads group i / (h / g)).
//
// The backward recomputes the states: a forward pass keeps the state entering every block of
// `kBlock` tokens, then the blocks are walked backwards, each block's states recomputed from its
// entry state into a small buffer (kBlock x p x n), so the extra memory is per thread, not per token.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;
constexpr int64_t kTransposeFrom = 16;  // sequences at least this long run forward_t_impl

// The logistic function without an overflow: exp of a non-positive number only. (1 / (1 + exp(-v))
// overflows to inf below v = -88 in float32, and under -ffast-math, which assumes finite values, the
// vectorised division then gives NaN.)
template <typename T>
inline T sigmoid(T v) {
  const T e = std::exp(-std::abs(v));
  return v >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// SiLU's derivative, sigmoid(v) (1 + v (1 - sigmoid(v))), with 1 - sigmoid(v) = sigmoid(-v) taken from
// the same exp rather than by subtracting: at v = +1000 the vectorised division under -ffast-math may
// give sigmoid a last-bit error, which 1 - sigmoid turned into 6e-8 and the factor v into 6e-5.
template <typename T>
inline T silu_grad(T v) {
  const T e = std::exp(-std::abs(v));
  const T r = T(1) / (T(1) + e);
  const T sig = v >= T(0) ? r : e * r;
  const T rest = v >= T(0) ? e * r : r;  // 1 - sig
  return sig * (T(1) + v * rest);
}

struct Dims {
  int64_t b, l, h, p, g, n;
};

Dims dims_of(const at::Tensor& x, const at::Tensor& B) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), B.size(2), B.size(3)};
}

void check(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
           const at::Tensor& C, const at::Tensor& state) {
  TORCH_CHECK(x.device().is_cpu(), "ssd_cpu: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 4 && dt.dim() == 3 && A.dim() == 1 && B.dim() == 4 && C.dim() == 4 && state.dim() == 4,
              "ssd_cpu: expected x (b,l,h,p), dt (b,l,h), A (h), B/C (b,l,g,n), state (b,h,p,n)");
  for (const at::Tensor* t : {&dt, &A, &B, &C, &state}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "ssd_cpu: all tensors must share x's dtype");
    TORCH_CHECK(t->is_contiguous(), "ssd_cpu: tensors must be contiguous");
  }
  TORCH_CHECK(x.is_contiguous(), "ssd_cpu: tensors must be contiguous");
  const Dims d = dims_of(x, B);
  TORCH_CHECK(d.h % d.g == 0, "ssd_cpu: heads must be a multiple of groups");
  TORCH_CHECK(dt.size(0) == d.b && dt.size(1) == d.l && dt.size(2) == d.h && A.size(0) == d.h, "ssd_cpu: dt/A shape");
  TORCH_CHECK(B.sizes() == C.sizes() && B.size(0) == d.b && B.size(1) == d.l, "ssd_cpu: B/C shape");
  TORCH_CHECK(state.size(0) == d.b && state.size(1) == d.h && state.size(2) == d.p && state.size(3) == d.n,
              "ssd_cpu: state shape");
}

// One token of the forward: s = e * s + xd B^T, and y = s C when kOut (else the states only).
// N is the state size when known at compile time (the common sizes), else 0 and n is read at run time.
template <typename T, bool kOut, int N>
inline void step(T* __restrict__ s, const T* __restrict__ xv, T dtv, T e, const T* __restrict__ Bv,
                 const T* __restrict__ Cv, T* __restrict__ y, int64_t p, int64_t n_rt) {
  const int64_t n = N > 0 ? N : n_rt;
  for (int64_t i = 0; i < p; ++i) {
    T* __restrict__ row = s + i * n;
    const T xd = xv[i] * dtv;
    if constexpr (kOut) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) {
        const T v = row[k] * e + xd * Bv[k];
        row[k] = v;
        acc += v * Cv[k];
      }
      y[i] = acc;
    } else {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) row[k] = row[k] * e + xd * Bv[k];
    }
  }
}

// The same state update out of place: dst = e * src + xd B^T (no output).
template <typename T, int N>
inline void step_into(T* __restrict__ dst, const T* __restrict__ src, const T* __restrict__ xv, T dtv, T e,
                      const T* __restrict__ Bv, int64_t p, int64_t n_rt) {
  const int64_t n = N > 0 ? N : n_rt;
  for (int64_t i = 0; i < p; ++i) {
    const T xd = xv[i] * dtv;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[i * n + k] = src[i * n + k] * e + xd * Bv[k];
  }
}

// Calls f.template operator()<N>() with N = n for the state sizes worth specialising, else N = 0.
template <typename F>
void with_state_size(int64_t n, F&& f) {
  switch (n) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// The raw pointers a forward reads (x, dt, A, B, C) and writes (state, y).
template <typename T>
std::tuple<const T*, const T*, const T*, const T*, const T*, T*, T*> forward_ptrs(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    at::Tensor& state, at::Tensor& y) {
  return {x.data_ptr<T>(), dt.data_ptr<T>(), A.data_ptr<T>(), B.data_ptr<T>(), C.data_ptr<T>(), state.data_ptr<T>(),
          y.data_ptr<T>()};
}

template <typename T, int N>
void forward_impl(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, at::Tensor& state, at::Tensor& y) {
  const Dims d = dims_of(x, B);
  const int64_t r = d.h / d.g;
  const T *X, *DT, *AA, *BB, *CC;
  T *S, *Y;
  std::tie(X, DT, AA, BB, CC, S, Y) = forward_ptrs<T>(x, dt, A, B, C, state, y);  // plain locals: C++17 lambdas may not capture structured bindings
  at::parallel_for(0, d.b * d.h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / d.h, hi = bh % d.h, gi = hi / r;
      T* s = S + bh * d.p * d.n;
      const T a = AA[hi];
      for (int64_t t = 0; t < d.l; ++t) {
        const int64_t tok = bi * d.l + t;
        const T dtv = DT[tok * d.h + hi];
        step<T, true, N>(s, X + (tok * d.h + hi) * d.p, dtv, std::exp(dtv * a), BB + (tok * d.g + gi) * d.n,
                CC + (tok * d.g + gi) * d.n, Y + (tok * d.h + hi) * d.p, d.p, d.n);
      }
    }
  });
}

// The forward over a sequence with each head's state held transposed, (n, p), in a per-thread
// buffer: a token updates the n state columns one after another, each a vector over p, and the
// output accumulates over them in p lanes, so no horizontal sum is needed (the (p, n) layout of
// forward_impl needs one per row and token). Two transposes per (batch row, head) and sequence.
// P is the head dimension when known at compile time (else 0), so the output stays in registers.
template <typename T, int N, int P>
void forward_t_impl(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, at::Tensor& state, at::Tensor& y) {
  const Dims d = dims_of(x, B);
  const int64_t r = d.h / d.g;
  const int64_t n = N > 0 ? N : d.n, p = P > 0 ? P : d.p;
  const T *X, *DT, *AA, *BB, *CC;
  T *S, *Y;
  std::tie(X, DT, AA, BB, CC, S, Y) = forward_ptrs<T>(x, dt, A, B, C, state, y);  // plain locals: C++17 lambdas may not capture structured bindings
  at::parallel_for(0, d.b * d.h, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> st(n * p), xd_v(p), acc_v(p);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / d.h, hi = bh % d.h, gi = hi / r;
      T* s = S + bh * p * n;
      for (int64_t i = 0; i < p; ++i)
        for (int64_t k = 0; k < n; ++k) st[k * p + i] = s[i * n + k];
      const T a = AA[hi];
      for (int64_t t = 0; t < d.l; ++t) {
        const int64_t tok = bi * d.l + t;
        const T dtv = DT[tok * d.h + hi];
        const T e = std::exp(dtv * a);
        const T* __restrict__ xv = X + (tok * d.h + hi) * p;
        const T* __restrict__ Bv = BB + (tok * d.g + gi) * n;
        const T* __restrict__ Cv = CC + (tok * d.g + gi) * n;
        T* __restrict__ yv = Y + (tok * d.h + hi) * p;
        T xd_a[P > 0 ? P : 1], acc_a[P > 0 ? P : 1];
        T* __restrict__ xd = P > 0 ? xd_a : xd_v.data();
        T* __restrict__ acc = P > 0 ? acc_a : acc_v.data();
#pragma omp simd
        for (int64_t i = 0; i < p; ++i) {
          xd[i] = xv[i] * dtv;
          acc[i] = T(0);
        }
        for (int64_t k = 0; k < n; ++k) {
          T* __restrict__ col = st.data() + k * p;
          const T bk = Bv[k], ck = Cv[k];
#pragma omp simd
          for (int64_t i = 0; i < p; ++i) {
            const T v = col[i] * e + bk * xd[i];
            col[i] = v;
            acc[i] += ck * v;
          }
        }
#pragma omp simd
        for (int64_t i = 0; i < p; ++i) yv[i] = acc[i];
      }
      for (int64_t i = 0; i < p; ++i)
        for (int64_t k = 0; k < n; ++k) s[i * n + k] = st[k * p + i];
    }
  });
}

template <typename T, int N>
void backward_impl(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const at::Tensor& state0, const at::Tensor& dy, const at::Tensor& dstate,
                   at::Tensor& dx, at::Tensor& ddt, at::Tensor& dA_bh, at::Tensor& dB_h, at::Tensor& dC_h,
                   at::Tensor& dstate0) {
  const Dims d = dims_of(x, B);
  const int64_t r = d.h / d.g, pn = d.p * d.n;
  const int64_t nblocks = (d.l + kBlock - 1) / kBlock;
  const T* X = x.data_ptr<T>();
  const T* DT = dt.data_ptr<T>();
  const T* AA = A.data_ptr<T>();
  const T* BB = B.data_ptr<T>();
  const T* CC = C.data_ptr<T>();
  const T* S0 = state0.data_ptr<T>();
  const T* DY = dy.data_ptr<T>();
  const T* DS = dstate.data_ptr<T>();
  T* DX = dx.data_ptr<T>();
  T* DDT = ddt.data_ptr<T>();
  T* DA = dA_bh.data_ptr<T>();
  T* DBh = dB_h.data_ptr<T>();  // (b, l, h, n): per head, summed over a group's heads by the caller
  T* DCh = dC_h.data_ptr<T>();
  T* DS0 = dstate0.data_ptr<T>();
  at::parallel_for(0, d.b * d.h, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> entry(nblocks * pn);     // the state entering each block
    std::vector<T> states((kBlock + 1) * pn);  // one block's states: [0] entering, [j + 1] after token j
    std::vector<T> g(pn);                    // dL/ds_t, walked backwards
    std::vector<T> dxd(d.p);
    std::vector<T> acc(2 * d.n);             // dB_t, dC_t of one token, summed over the head's rows
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / d.h, hi = bh % d.h, gi = hi / r;
      const T a = AA[hi];
      auto tok_of = [&](int64_t t) { return bi * d.l + t; };
      // 1. forward again, keeping each block's entry state
      std::copy(S0 + bh * pn, S0 + (bh + 1) * pn, states.begin());
      for (int64_t t = 0; t < d.l; ++t) {
        if (t % kBlock == 0) std::copy(states.begin(), states.begin() + pn, entry.begin() + (t / kBlock) * pn);
        const int64_t tok = tok_of(t);
        const T dtv = DT[tok * d.h + hi];
        step<T, false, N>(states.data(), X + (tok * d.h + hi) * d.p, dtv, std::exp(dtv * a), BB + (tok * d.g + gi) * d.n,
                nullptr, nullptr, d.p, d.n);
      }
      // 2. backwards, block by block
      std::copy(DS + bh * pn, DS + (bh + 1) * pn, g.begin());
      T dA_acc = 0;
      for (int64_t kb = nblocks - 1; kb >= 0; --kb) {
        const int64_t t0 = kb * kBlock, t1 = std::min(d.l, t0 + kBlock);
        std::copy(entry.begin() + kb * pn, entry.begin() + (kb + 1) * pn, states.begin());
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t tok = tok_of(t), j = t - t0;
          const T dtv = DT[tok * d.h + hi];
          step_into<T, N>(states.data() + (j + 1) * pn, states.data() + j * pn, X + (tok * d.h + hi) * d.p, dtv,
                          std::exp(dtv * a), BB + (tok * d.g + gi) * d.n, d.p, d.n);
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t tok = tok_of(t), j = t - t0;
          const T* s_t = states.data() + (j + 1) * pn;
          const T* s_prev = states.data() + j * pn;
          const T* xv = X + (tok * d.h + hi) * d.p;
          const T* Bv = BB + (tok * d.g + gi) * d.n;
          const T* Cv = CC + (tok * d.g + gi) * d.n;
          const T* dyv = DY + (tok * d.h + hi) * d.p;
          T* __restrict__ dBv = DBh + (tok * d.h + hi) * d.n;
          T* __restrict__ dCv = DCh + (tok * d.h + hi) * d.n;
          const T dtv = DT[tok * d.h + hi];
          const T e = std::exp(dtv * a);
          const int64_t n = N > 0 ? N : d.n;
          T* __restrict__ dBa = acc.data();
          T* __restrict__ dCa = acc.data() + n;
          for (int64_t k = 0; k < 2 * n; ++k) acc[k] = 0;
          T de = 0;
          // four rows at a time: four independent dot-product chains instead of one
          int64_t i = 0;
          for (; i + 4 <= d.p; i += 4) {
            T* __restrict__ g0 = g.data() + i * n;
            T* __restrict__ g1 = g0 + n;
            T* __restrict__ g2 = g1 + n;
            T* __restrict__ g3 = g2 + n;
            const T* __restrict__ s0 = s_t + i * n;
            const T* __restrict__ p0 = s_prev + i * n;
            const T y0 = dyv[i], y1 = dyv[i + 1], y2 = dyv[i + 2], y3 = dyv[i + 3];
            const T x0 = xv[i] * dtv, x1 = xv[i + 1] * dtv, x2 = xv[i + 2] * dtv, x3 = xv[i + 3] * dtv;
            T d0 = 0, d1 = 0, d2 = 0, d3 = 0, de_i = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3, de_i)
            for (int64_t k = 0; k < n; ++k) {
              const T c = Cv[k], bk = Bv[k];
              const T a0 = g0[k] + y0 * c, a1 = g1[k] + y1 * c, a2 = g2[k] + y2 * c, a3 = g3[k] + y3 * c;
              dCa[k] += (s0[k] * y0 + s0[n + k] * y1) + (s0[2 * n + k] * y2 + s0[3 * n + k] * y3);
              dBa[k] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3);
              d0 += a0 * bk;
              d1 += a1 * bk;
              d2 += a2 * bk;
              d3 += a3 * bk;
              de_i += (a0 * p0[k] + a1 * p0[n + k]) + (a2 * p0[2 * n + k] + a3 * p0[3 * n + k]);
              g0[k] = a0 * e;
              g1[k] = a1 * e;
              g2[k] = a2 * e;
              g3[k] = a3 * e;
            }
            dxd[i] = d0;
            dxd[i + 1] = d1;
            dxd[i + 2] = d2;
            dxd[i + 3] = d3;
            de += de_i;
          }
          for (; i < d.p; ++i) {
            T* __restrict__ gr = g.data() + i * n;
            const T* __restrict__ sr = s_t + i * n;
            const T* __restrict__ pr = s_prev + i * n;
            const T dyi = dyv[i], xd = xv[i] * dtv;
            T dxd_i = 0, de_i = 0;
#pragma omp simd reduction(+ : dxd_i, de_i)
            for (int64_t k = 0; k < n; ++k) {
              const T gk = gr[k] + dyi * Cv[k];  // y_t = s_t C_t adds dy_t C_t^T to dL/ds_t
              dCa[k] += sr[k] * dyi;
              dxd_i += gk * Bv[k];
              dBa[k] += gk * xd;
              de_i += gk * pr[k];
              gr[k] = gk * e;  // dL/ds_{t-1}
            }
            dxd[i] = dxd_i;
            de += de_i;
          }
          for (int64_t k = 0; k < n; ++k) {
            dBv[k] = dBa[k];
            dCv[k] = dCa[k];
          }
          const T da = de * e;  // e = exp(dt a): d/d(dt a)
          T dxdt_x = 0;
          T* dxv = DX + (tok * d.h + hi) * d.p;
          for (int64_t i = 0; i < d.p; ++i) {
            dxv[i] = dxd[i] * dtv;
            dxdt_x += dxd[i] * xv[i];
          }
          DDT[tok * d.h + hi] = da * a + dxdt_x;
          dA_acc += da * dtv;
        }
      }
      DA[bh] = dA_acc;
      std::copy(g.begin(), g.end(), DS0 + bh * pn);
    }
  });
}

// Returns (y, final state); `state` is not modified (a copy is advanced). Sequences of at least
// kTransposeFrom tokens run with the state transposed (forward_t_impl) unless `rows` asks for the
// (p, n) layout throughout (the twin the parity tests and the benchmark compare against).
std::vector<at::Tensor> ssd_forward_layout(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor B, at::Tensor C,
                                           at::Tensor state, bool rows) {
  check(x, dt, A, B, C, state);
  at::Tensor s = state.clone();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_forward", [&] {
    with_state_size(B.size(3), [&](auto n) {
      constexpr int N = decltype(n)::value;
      if (rows || x.size(1) < kTransposeFrom) forward_impl<scalar_t, N>(x, dt, A, B, C, s, y);
      else if (x.size(3) == 64) forward_t_impl<scalar_t, N, 64>(x, dt, A, B, C, s, y);
      else forward_t_impl<scalar_t, N, 0>(x, dt, A, B, C, s, y);
    });
  });
  return {y, s};
}

std::vector<at::Tensor> ssd_forward(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor B, at::Tensor C,
                                    at::Tensor state) {
  return ssd_forward_layout(x, dt, A, B, C, state, false);
}

std::vector<at::Tensor> ssd_forward_rows(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor B, at::Tensor C,
                                         at::Tensor state) {
  return ssd_forward_layout(x, dt, A, B, C, state, true);
}

// One decoding step for a batch, in place: x (b, h, p), dt (b, h), B/C (b, g, n), state (b, h, p, n).
at::Tensor ssd_step_(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor B, at::Tensor C, at::Tensor state) {
  at::Tensor x4 = x.unsqueeze(1), dt3 = dt.unsqueeze(1), B4 = B.unsqueeze(1), C4 = C.unsqueeze(1);
  check(x4, dt3, A, B4, C4, state);
  at::Tensor y = at::empty_like(x4);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_step", [&] {
    with_state_size(B.size(2), [&](auto n) { forward_impl<scalar_t, decltype(n)::value>(x4, dt3, A, B4, C4, state, y); });
  });
  return y.squeeze(1);
}

// Gradients of ssd_forward: (dx, ddt, dA, dB, dC, dstate0) given dy and the final state's gradient.
std::vector<at::Tensor> ssd_backward(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor B, at::Tensor C,
                                     at::Tensor state0, at::Tensor dy, at::Tensor dstate) {
  check(x, dt, A, B, C, state0);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(), "ssd_cpu: dy");
  TORCH_CHECK(dstate.sizes() == state0.sizes() && dstate.is_contiguous() && dstate.scalar_type() == x.scalar_type(),
              "ssd_cpu: dstate");
  const Dims d = dims_of(x, B);
  at::Tensor dx = at::empty_like(x), ddt = at::empty_like(dt), dstate0 = at::empty_like(state0);
  at::Tensor dA_bh = at::empty({d.b, d.h}, x.options());
  at::Tensor dB_h = at::empty({d.b, d.l, d.h, d.n}, x.options()), dC_h = at::empty({d.b, d.l, d.h, d.n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_backward", [&] {
    with_state_size(d.n, [&](auto n) {
      backward_impl<scalar_t, decltype(n)::value>(x, dt, A, B, C, state0, dy, dstate, dx, ddt, dA_bh, dB_h, dC_h, dstate0);
    });
  });
  const int64_t r = d.h / d.g;
  at::Tensor dB = dB_h.view({d.b, d.l, d.g, r, d.n}).sum(3), dC = dC_h.view({d.b, d.l, d.g, r, d.n}).sum(3);
  return {dx, ddt, dA_bh.sum(0), dB, dC, dstate0};
}

// ---- the causal depthwise conv with SiLU, the op in front of the scan ----------------------------
// x (b, l, d), weight (w, d) taps-major: tap k of channel c, W[k * d + c], multiplies the input w-1-k
// steps back; bias (d,). out = silu(pre).
// Work is split over channel blocks (every task walks all rows), so the weight and bias gradients
// need no reduction across threads.
constexpr int64_t kChannels = 64;

// The forward splits rows (batch row, token) over threads instead: each row is one vector loop over
// all d channels per tap, reading the w rows before it, which stream through the cache in order.
template <typename T>
void conv_forward_impl(const T* X, const T* W, const T* Bias, T* Y, int64_t b, int64_t l, int64_t d, int64_t w) {
  at::parallel_for(0, b * l, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % l;
      T* __restrict__ yr = Y + row * d;
      if (Bias) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) yr[c] = Bias[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) yr[c] = T(0);
      }
      for (int64_t k = 0; k < w; ++k) {
        const int64_t back = w - 1 - k;
        if (t < back) continue;
        const T* __restrict__ xr = X + (row - back) * d;
        const T* __restrict__ wk = W + k * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) yr[c] += wk[c] * xr[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) yr[c] = yr[c] * sigmoid(yr[c]);
    }
  });
}

template <typename T>
void conv_backward_impl(const T* X, const T* W, const T* Bias, const T* DY, T* DX, T* DW, T* DBias,
                        int64_t b, int64_t l, int64_t d, int64_t w) {
  at::parallel_for(0, (d + kChannels - 1) / kChannels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> dpre(kChannels * w);  // dL/dpre for the last w rows of this block, a ring
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kChannels, c1 = std::min(d, c0 + kChannels), nc = c1 - c0;
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t k = 0; k < w; ++k) DW[k * d + c] = 0;
        if (DBias) DBias[c] = 0;
      }
      for (int64_t bi = 0; bi < b; ++bi) {
        // dL/dpre_t, then scatter: x_{t-(w-1)+k} feeds pre_t through tap k.
        // Walk t backwards so dx_s is complete once the rows s..s+w-1 are done.
        for (int64_t t = l - 1; t >= 0; --t) {
          T* dp = dpre.data() + (t % w) * kChannels;
          {
            const T* dyr = DY + (bi * l + t) * d;
            T pre[kChannels];
            for (int64_t c = 0; c < nc; ++c) pre[c] = Bias ? Bias[c0 + c] : T(0);
            for (int64_t k = 0; k < w; ++k) {
              const int64_t src = t - (w - 1) + k;
              if (src < 0) continue;
              const T* xr = X + (bi * l + src) * d + c0;
#pragma omp simd
              for (int64_t c = 0; c < nc; ++c) pre[c] += W[k * d + c0 + c] * xr[c];
            }
#pragma omp simd
            for (int64_t c = 0; c < nc; ++c) {
              dp[c] = dyr[c0 + c] * silu_grad(pre[c]);
            }
            for (int64_t k = 0; k < w; ++k) {
              const int64_t src = t - (w - 1) + k;
              if (src < 0) continue;
              const T* xr = X + (bi * l + src) * d + c0;
#pragma omp simd
              for (int64_t c = 0; c < nc; ++c) DW[k * d + c0 + c] += dp[c] * xr[c];
            }
            if (DBias)
              for (int64_t c = 0; c < nc; ++c) DBias[c0 + c] += dp[c];
          }
          // row s = t: x_s fed pre_s, ..., pre_{s+w-1}, all computed by now (or past the end)
          const int64_t s_row = t;
          {
            T* dxr = DX + (bi * l + s_row) * d + c0;
            for (int64_t c = 0; c < nc; ++c) dxr[c] = 0;
            for (int64_t k = 0; k < w; ++k) {
              const int64_t tt = s_row + (w - 1) - k;  // pre_tt reads x_s through tap k
              if (tt >= l) continue;
              const T* dpt = dpre.data() + (tt % w) * kChannels;
#pragma omp simd
              for (int64_t c = 0; c < nc; ++c) dxr[c] += W[k * d + c0 + c] * dpt[c];
            }
          }
        }
      }
    }
  });
}

at::Tensor conv_forward(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), "conv_cpu: x must be a contiguous (b, l, d) CPU tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(2) && weight.is_contiguous() &&
              weight.scalar_type() == x.scalar_type(), "conv_cpu: weight must be (w, d), contiguous, x's dtype");
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(2) && bias->is_contiguous() &&
                        bias->scalar_type() == x.scalar_type(), "conv_cpu: bias must be (d,), x's dtype");
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_forward", [&] {
    conv_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                                x.size(0), x.size(1), x.size(2), weight.size(0));
  });
  return y;
}

// (dx, dweight, dbias) of conv_forward; dbias is undefined without a bias.
std::vector<at::Tensor> conv_backward(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, at::Tensor dy) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(), "conv_cpu: dy");
  at::Tensor dx = at::empty_like(x), dw = at::empty_like(weight);
  at::Tensor db = bias ? at::empty_like(*bias) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_backward", [&] {
    conv_backward_impl<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                 bias ? bias->data_ptr<scalar_t>() : nullptr, dy.data_ptr<scalar_t>(),
                                 dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                                 bias ? db.data_ptr<scalar_t>() : nullptr, x.size(0), x.size(1), x.size(2),
                                 weight.size(0));
  });
  return {dx, dw, db};
}

// ---- the gated RMSNorm after the scan: out = rmsnorm(y * silu(z)) * weight, per group of channels --
// y, z (rows, d), weight (d,); groups of `gs` channels are normalised separately. Float32/64 only
// (callers convert); the weight's gradient is summed per thread, then over threads.

// One row of d channels: o = rmsnorm(y * silu(z)) * W, per group of gs channels.
template <typename T>
inline void norm_row(const T* y, const T* z, const T* W, T* o, int64_t d, int64_t gs, T eps) {
  for (int64_t g0 = 0; g0 < d; g0 += gs) {
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = g0; c < g0 + gs; ++c) {
      const T u = y[c] * z[c] * sigmoid(z[c]);
      o[c] = u;
      ss += u * u;
    }
    const T rs = T(1) / std::sqrt(ss / T(gs) + eps);
#pragma omp simd
    for (int64_t c = g0; c < g0 + gs; ++c) o[c] = o[c] * rs * W[c];
  }
}

template <typename T>
void norm_forward_impl(const T* Y, const T* Z, const T* W, T* O, int64_t rows, int64_t d, int64_t gs, T eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row<T>(Y + r * d, Z + r * d, W, O + r * d, d, gs, eps);
  });
}

template <typename T>
void norm_backward_impl(const T* Y, const T* Z, const T* W, const T* DO, T* DY, T* DZ, T* DWpart,
                        int64_t rows, int64_t d, int64_t gs, T eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    T* dw = DWpart + at::get_thread_num() * d;
    std::vector<T> u(gs);
    for (int64_t r = begin; r < end; ++r) {
      const T* y = Y + r * d;
      const T* z = Z + r * d;
      const T* dout = DO + r * d;
      for (int64_t g0 = 0; g0 < d; g0 += gs) {
        T ss = 0, dot = 0;
#pragma omp simd reduction(+ : ss, dot)
        for (int64_t c = 0; c < gs; ++c) {
          const T zc = z[g0 + c];
          const T uc = y[g0 + c] * zc * sigmoid(zc);
          u[c] = uc;
          ss += uc * uc;
          dot += uc * W[g0 + c] * dout[g0 + c];
        }
        const T rs = T(1) / std::sqrt(ss / T(gs) + eps);
        const T k = rs * rs * rs * dot / T(gs);
#pragma omp simd
        for (int64_t c = 0; c < gs; ++c) {
          const int64_t j = g0 + c;
          const T du = rs * W[j] * dout[j] - k * u[c];
          const T sg = sigmoid(z[j]);
          DY[r * d + j] = du * z[j] * sg;
          DZ[r * d + j] = du * y[j] * silu_grad(z[j]);
          dw[j] += dout[j] * u[c] * rs;
        }
      }
    }
  });
}

at::Tensor norm_forward(at::Tensor y, at::Tensor z, at::Tensor weight, int64_t group_size, double eps) {
  TORCH_CHECK(y.device().is_cpu() && y.is_contiguous() && z.is_contiguous() && weight.is_contiguous() &&
              y.sizes() == z.sizes() && y.scalar_type() == z.scalar_type() && weight.scalar_type() == y.scalar_type(),
              "norm_cpu: y, z (..., d) and weight (d,) must be contiguous CPU tensors of one dtype");
  const int64_t d = y.size(-1);
  TORCH_CHECK(weight.numel() == d && group_size > 0 && d % group_size == 0, "norm_cpu: weight / group size");
  at::Tensor out = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "norm_forward", [&] {
    norm_forward_impl<scalar_t>(y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                out.data_ptr<scalar_t>(), y.numel() / d, d, group_size, static_cast<scalar_t>(eps));
  });
  return out;
}

// (dy, dz, dweight) of norm_forward.
std::vector<at::Tensor> norm_backward(at::Tensor y, at::Tensor z, at::Tensor weight, int64_t group_size, double eps,
                                      at::Tensor dout) {
  TORCH_CHECK(dout.sizes() == y.sizes() && dout.is_contiguous() && dout.scalar_type() == y.scalar_type(), "norm_cpu: dout");
  const int64_t d = y.size(-1);
  at::Tensor dy = at::empty_like(y), dz = at::empty_like(z);
  at::Tensor part = at::zeros({at::get_num_threads(), d}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "norm_backward", [&] {
    norm_backward_impl<scalar_t>(y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                 dout.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
                                 part.data_ptr<scalar_t>(), y.numel() / d, d, group_size, static_cast<scalar_t>(eps));
  });
  return {dy, dz, part.sum(0)};
}

// ---- decoding steps of the whole mixer, between in_proj and out_proj -----------------------------
// zxbcdt (b, T, 2*di + 2*g*n + h): the in_proj outputs of T tokens per sequence, rows [z | x B C | dt];
// conv_state (b, cd, w-1) the conv's previous inputs, oldest first, and ssm (b, h, p, n) the scan
// state; conv weight (cd, w), bias (cd,); A, D, dt_bias (h,); norm weight (di,). Sequence i runs its
// first counts[i] tokens (all T when counts is null), one after another, each exactly as one
// decoding step: the conv step, softplus, the scan step with the D skip, the gated RMSNorm (the same
// maths as the unfused step in arc/mamba2.py). OUT (b, T, di), when given, gets each token's output,
// ready for out_proj. With `in_place` the states are advanced; without, each sequence runs on a
// private copy of its states and they are left as they were (a speculative decoder's check).
template <typename T, int N>
void mixer_run_impl(const T* ZX, T* CS, const T* CW, const T* CB, T* SS, const T* AA, const T* DD, const T* DTB,
                    const T* NW, const int64_t* counts, bool in_place, T* OUT, int64_t b, int64_t tt, int64_t h,
                    int64_t p, int64_t g, int64_t n_rt, int64_t w, T eps) {
  const int64_t n = N > 0 ? N : n_rt;
  const int64_t di = h * p, cd = di + 2 * g * n, row = 2 * di + 2 * g * n + h, r = h / g, gs = di / g;
  const int64_t conv_size = cd * (w - 1), ssm_size = h * p * n;
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xc(cd), y(di), conv_copy(in_place ? 0 : conv_size), ssm_copy(in_place ? 0 : ssm_size);
    for (int64_t bi = begin; bi < end; ++bi) {
      T* cs = CS + bi * conv_size;
      T* ss = SS + bi * ssm_size;
      if (!in_place) {
        std::copy(cs, cs + conv_size, conv_copy.begin());
        std::copy(ss, ss + ssm_size, ssm_copy.begin());
        cs = conv_copy.data();
        ss = ssm_copy.data();
      }
      const int64_t count = counts ? counts[bi] : tt;
      for (int64_t t = 0; t < count; ++t) {
        const T* z = ZX + (bi * tt + t) * row;
        const T* xin = z + di;
        const T* dtr = xin + cd;
        for (int64_t c = 0; c < cd; ++c) {  // conv step: taps 0..w-2 read the state, tap w-1 the new input
          T* sc = cs + c * (w - 1);
          const T* wc = CW + c * w;
          T acc = (CB ? CB[c] : T(0)) + wc[w - 1] * xin[c];
          for (int64_t k = 0; k < w - 1; ++k) acc += wc[k] * sc[k];
          for (int64_t k = 0; k + 1 < w - 1; ++k) sc[k] = sc[k + 1];
          sc[w - 2] = xin[c];
          xc[c] = acc;
        }
#pragma omp simd
        for (int64_t c = 0; c < cd; ++c) xc[c] = xc[c] * sigmoid(xc[c]);  // SiLU, a vector loop of its own
        for (int64_t hi = 0; hi < h; ++hi) {
          const T v = dtr[hi] + DTB[hi];
          const T dtv = v > T(20) ? v : std::log1p(std::exp(v));  // softplus, as F.softplus (threshold 20)
          const int64_t gi = hi / r;
          if (!OUT) {  // committing: the state only
            step<T, false, N>(ss + hi * p * n, xc.data() + hi * p, dtv, std::exp(dtv * AA[hi]), xc.data() + di + gi * n,
                              nullptr, nullptr, p, n);
            continue;
          }
          step<T, true, N>(ss + hi * p * n, xc.data() + hi * p, dtv, std::exp(dtv * AA[hi]), xc.data() + di + gi * n,
                           xc.data() + di + g * n + gi * n, y.data() + hi * p, p, n);
          for (int64_t i = 0; i < p; ++i) y[hi * p + i] += DD[hi] * xc[hi * p + i];
        }
        if (OUT) norm_row<T>(y.data(), z, NW, OUT + (bi * tt + t) * di, di, gs, eps);  // the gated RMSNorm
      }
    }
  });
}

// Checks and dispatch of mixer_run_impl; zxbcdt is (b, T, row). Returns OUT (b, T, di), or an
// undefined tensor without `out`.
at::Tensor mixer_run(at::Tensor zxbcdt, at::Tensor conv_state, at::Tensor conv_w, c10::optional<at::Tensor> conv_b,
                     at::Tensor ssm, at::Tensor A, at::Tensor D, at::Tensor dt_bias, at::Tensor norm_w, int64_t ngroups,
                     double eps, c10::optional<at::Tensor> counts, bool in_place, bool out) {
  const auto dtype = ssm.scalar_type();
  for (const at::Tensor* t : {&zxbcdt, &conv_state, &conv_w, &ssm, &A, &D, &dt_bias, &norm_w}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == dtype,
                "mixer_step: contiguous CPU tensors of one dtype expected");
  }
  if (conv_b) TORCH_CHECK(conv_b->is_contiguous() && conv_b->scalar_type() == dtype, "mixer_step: conv bias");
  const int64_t b = ssm.size(0), h = ssm.size(1), p = ssm.size(2), n = ssm.size(3), w = conv_w.size(1);
  const int64_t di = h * p, cd = di + 2 * ngroups * n;
  TORCH_CHECK(h % ngroups == 0 && di % ngroups == 0, "mixer_step: groups");
  TORCH_CHECK(zxbcdt.dim() == 3 && zxbcdt.size(0) == b && zxbcdt.size(2) == 2 * di + 2 * ngroups * n + h,
              "mixer_step: zxbcdt shape");
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(0) == b && conv_state.size(1) == cd && conv_state.size(2) == w - 1 &&
              conv_w.size(0) == cd && w >= 2, "mixer_step: conv shapes");
  TORCH_CHECK(A.numel() == h && D.numel() == h && dt_bias.numel() == h && norm_w.numel() == di, "mixer_step: per-head shapes");
  const int64_t tt = zxbcdt.size(1);
  if (counts) {
    TORCH_CHECK(counts->device().is_cpu() && counts->is_contiguous() && counts->scalar_type() == at::kLong &&
                counts->numel() == b, "mixer_step: counts must be (b,) int64 on the CPU");
    TORCH_CHECK(!out, "mixer_step: counts run fewer tokens than the output would hold");
    const int64_t* c = counts->data_ptr<int64_t>();
    for (int64_t i = 0; i < b; ++i)
      TORCH_CHECK(c[i] >= 0 && c[i] <= tt, "mixer_step: counts[", i, "] = ", c[i], " is outside [0, ", tt, "]");
  }
  at::Tensor result = out ? at::empty({b, tt, di}, ssm.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "mixer_step", [&] {
    with_state_size(n, [&](auto nn) {
      mixer_run_impl<scalar_t, decltype(nn)::value>(
          zxbcdt.data_ptr<scalar_t>(), conv_state.data_ptr<scalar_t>(), conv_w.data_ptr<scalar_t>(),
          conv_b ? conv_b->data_ptr<scalar_t>() : nullptr, ssm.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
          D.data_ptr<scalar_t>(), dt_bias.data_ptr<scalar_t>(), norm_w.data_ptr<scalar_t>(),
          counts ? counts->data_ptr<int64_t>() : nullptr, in_place, out ? result.data_ptr<scalar_t>() : nullptr,
          b, tt, h, p, ngroups, n, w, static_cast<scalar_t>(eps));
    });
  });
  return result;
}

// One decoding step: zxbcdt (b, row); both states updated in place. Returns (b, di).
at::Tensor mixer_step_(at::Tensor zxbcdt, at::Tensor conv_state, at::Tensor conv_w, c10::optional<at::Tensor> conv_b,
                       at::Tensor ssm, at::Tensor A, at::Tensor D, at::Tensor dt_bias, at::Tensor norm_w,
                       int64_t ngroups, double eps) {
  TORCH_CHECK(zxbcdt.dim() == 2, "mixer_step: zxbcdt must be (b, row)");
  return mixer_run(zxbcdt.unsqueeze(1), conv_state, conv_w, conv_b, ssm, A, D, dt_bias, norm_w, ngroups, eps,
                   c10::nullopt, true, true).squeeze(1);
}

// T tokens per sequence from the states, which are left unchanged: zxbcdt (b, T, row) -> (b, T, di).
at::Tensor mixer_extend(at::Tensor zxbcdt, at::Tensor conv_state, at::Tensor conv_w, c10::optional<at::Tensor> conv_b,
                        at::Tensor ssm, at::Tensor A, at::Tensor D, at::Tensor dt_bias, at::Tensor norm_w,
                        int64_t ngroups, double eps) {
  return mixer_run(zxbcdt, conv_state, conv_w, conv_b, ssm, A, D, dt_bias, norm_w, ngroups, eps, c10::nullopt,
                   false, true);
}

// The states advanced in place past the first counts[i] (b,) of the T tokens of sequence i; no output.
void mixer_commit_(at::Tensor zxbcdt, at::Tensor conv_state, at::Tensor conv_w, c10::optional<at::Tensor> conv_b,
                   at::Tensor ssm, at::Tensor A, at::Tensor D, at::Tensor dt_bias, at::Tensor norm_w, int64_t ngroups,
                   double eps, at::Tensor counts) {
  mixer_run(zxbcdt, conv_state, conv_w, conv_b, ssm, A, D, dt_bias, norm_w, ngroups, eps, counts, true, false);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ssd_forward, "Mamba2 scan forward (recurrence): (y, final state)");
  m.def("forward_rows", &ssd_forward_rows, "forward with the state in its (p, n) layout throughout (the twin)");
  m.def("step_", &ssd_step_, "one decoding step, state updated in place");
  m.def("backward", &ssd_backward, "Mamba2 scan backward: (dx, ddt, dA, dB, dC, dstate0)");
  m.def("conv_forward", &conv_forward, "silu(causal depthwise conv + bias)");
  m.def("mixer_step_", &mixer_step_, "one decoding step of the Mamba2 mixer between in_proj and out_proj, states in place");
  m.def("mixer_extend", &mixer_extend, "T decoding steps from the states, left unchanged: the outputs (b, T, di)");
  m.def("mixer_commit_", &mixer_commit_, "the states advanced in place past counts[i] of the T tokens of sequence i");
  m.def("norm_forward", &norm_forward, "rmsnorm(y * silu(z)) * weight per group of channels");
  m.def("norm_backward", &norm_backward, "gradients of norm_forward: (dy, dz, dweight)");
  m.def("conv_backward", &conv_backward, "gradients of conv_forward: (dx, dweight, dbias)");
}
