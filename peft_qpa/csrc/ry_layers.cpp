// Fused CPU kernels for full RY layers of a real-amplitude statevector (see peft_qpa/fused_kernel.py).
//
// A layer is: optionally a gather of the state by a permutation (the CNOT chain before it), then
// RY(theta_q) on every qubit q. Qubit q is bit q of a basis index (Qiskit's little-endian order).
// All rotations of a layer commute, so they are applied in the order that suits the memory:
//   tile sweep:  for each tile of 2^t consecutive amplitudes (in L1/L2): the gather, the low kb
//                qubits (3 for float, 2 for double: one SIMD register) as one 2^kb x 2^kb matrix per
//                register-sized group (butterflies with a stride below the SIMD width do not
//                vectorize), then the other qubits below t as butterflies;
//   strip sweep: for each strip of W consecutive columns of the (2^(n-t) x 2^t) view: the qubits
//                t..n-1 as butterflies between rows.
// Two passes over the state per layer instead of one per qubit.
//
// Backward (adjoint): given the layer output y and lambda = dL/dy it undoes the layer in place
// (R^T on every qubit, then a scatter through the permutation) and returns dL/dtheta. Because the
// layer's rotations commute and RY'(theta) = J RY(theta) / 2 with J = RY(pi), which commutes with
// every rotation of the layer, dL/dtheta_q = <lambda, J_q y> / 2 can be contracted at any point of
// the undo sweep, from the values at hand. Per-tile and per-strip partial sums are added in a fixed
// order, so results do not depend on the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

#ifndef QPA_TILE_BITS
#define QPA_TILE_BITS 13
#endif
#ifndef QPA_STRIP
#define QPA_STRIP 512
#endif
constexpr int TILE_BITS = QPA_TILE_BITS;  // amplitudes per tile: 2^TILE_BITS
constexpr int64_t STRIP = QPA_STRIP;      // columns per strip of the high-qubit sweep
// One 32-byte SIMD register of T: 8 floats or 4 doubles. The low qubits of a tile (as many as fit in
// one register: 3 for float, 2 for double) form one small matrix applied per register-sized group;
// the butterflies of the other qubits then have strides of at least a register. The accumulators of
// the gradient contractions are also register-wide, so they vectorize without reassociation.
template <typename T>
constexpr int lanes() { return 32 / int(sizeof(T)); }
template <typename T>
constexpr int low_bits() { return lanes<T>() == 8 ? 3 : (lanes<T>() == 4 ? 2 : 1); }

template <typename T>
struct Layer {
  int n, t, kb;
  int64_t tile, ntiles, dim;  // dim = 2^kb
  const T* c;
  const T* s;
  T low[64];     // low-qubit matrix, stored column-major: low[col * dim + row]
  T low_t[64];   // its transpose, column-major

  Layer(int n_, const T* c_, const T* s_) : n(n_), c(c_), s(s_) {
    t = std::min(n, TILE_BITS);
    kb = std::min(n, low_bits<T>());
    tile = int64_t(1) << t;
    ntiles = int64_t(1) << (n - t);
    dim = int64_t(1) << kb;
    for (int64_t row = 0; row < dim; ++row)
      for (int64_t col = 0; col < dim; ++col) {
        T v = 1;  // entry (row, col) of RY_{kb-1} x ... x RY_0
        for (int q = 0; q < kb; ++q) {
          const int r = (row >> q) & 1, k = (col >> q) & 1;
          v *= r == k ? c[q] : (r ? s[q] : -s[q]);
        }
        low[col * dim + row] = v;
        low_t[row * dim + col] = v;
      }
  }
};

// x <- M x for every group of D consecutive amplitudes; m column-major. Generic (small n only).
template <typename T, int D>
inline void apply_low_scalar(T* x, int64_t len, const T* m) {
  for (int64_t g = 0; g < len; g += D) {
    T out[D] = {};
    for (int col = 0; col < D; ++col)
      for (int row = 0; row < D; ++row) out[row] += m[col * D + row] * x[g + col];
    for (int row = 0; row < D; ++row) x[g + row] = out[row];
  }
}

// The same with a group held in one register (GCC/Clang vector extension): a column of M times a
// broadcast amplitude, D times. Written out because the scalar form above is not vectorized.
template <typename T>
inline void apply_low_vec(T* x, int64_t len, const T* m) {
  constexpr int D = lanes<T>();
  typedef T V __attribute__((vector_size(32)));
  V col[D];
  for (int c = 0; c < D; ++c) std::memcpy(&col[c], m + c * D, sizeof(V));
  for (int64_t g = 0; g < len; g += D) {
    V out = col[0] * x[g];
    for (int c = 1; c < D; ++c) out += col[c] * x[g + c];
    std::memcpy(x + g, &out, sizeof(V));
  }
}

// Where lane r of an output group reads its source under the CNOT chain (see Perm): lanes of the
// lower half from group G = a ^ (a << 1), of the upper half from G ^ 1, at offset r ^ (r << 1).
template <typename T>
constexpr int chain_offset(int r) { return (r ^ (r << 1)) & (lanes<T>() - 1); }

// apply_low_vec fused with the CNOT-chain gather: M is applied to the gathered lanes on the fly, so
// the gather costs broadcasts from two source groups instead of a separate pass.
template <typename T>
inline void apply_low_chain(T* x, const T* src, int64_t a0, int64_t groups, int64_t group_mask, const T* m) {
  constexpr int D = lanes<T>();
  typedef T V __attribute__((vector_size(32)));
  V col[D];
  for (int c = 0; c < D; ++c) std::memcpy(&col[c], m + c * D, sizeof(V));
  for (int64_t a = a0; a < a0 + groups; ++a) {
    const int64_t g = a ^ ((a << 1) & group_mask);
    const T* s0 = src + D * g;
    const T* s1 = src + D * (g ^ 1);
    V out = col[0] * s0[chain_offset<T>(0)];
    for (int c = 1; c < D / 2; ++c) out += col[c] * s0[chain_offset<T>(c)];
    for (int c = D / 2; c < D; ++c) out += col[c] * s1[chain_offset<T>(c)];
    std::memcpy(x + D * (a - a0), &out, sizeof(V));
  }
}

template <typename T>
inline void apply_low(T* x, int64_t len, const T* m, int64_t dim) {
  if (dim == lanes<T>()) return apply_low_vec(x, len, m);
  switch (dim) {
    case 4: apply_low_scalar<T, 4>(x, len, m); break;
    case 2: apply_low_scalar<T, 2>(x, len, m); break;
    default: break;  // dim 1: no qubit
  }
}

// acc[col][row] += lam[g+row] * y[g+col] over the groups (values before the undo), then
// y <- M^T y and lam <- M^T lam (mt: M^T, column-major). Generic (small n only).
template <typename T, int D>
inline void undo_low_scalar(T* y, T* lam, int64_t len, const T* mt, T* acc) {
  for (int64_t g = 0; g < len; g += D) {
    T oy[D] = {}, ol[D] = {};
    for (int col = 0; col < D; ++col)
      for (int row = 0; row < D; ++row) {
        acc[col * D + row] += lam[g + row] * y[g + col];
        oy[row] += mt[col * D + row] * y[g + col];
        ol[row] += mt[col * D + row] * lam[g + col];
      }
    for (int row = 0; row < D; ++row) {
      y[g + row] = oy[row];
      lam[g + row] = ol[row];
    }
  }
}

template <typename T>
inline void undo_low_vec(T* y, T* lam, int64_t len, const T* mt, T* acc) {
  constexpr int D = lanes<T>();
  typedef T V __attribute__((vector_size(32)));
  V col[D], sums[D];
  for (int c = 0; c < D; ++c) {
    std::memcpy(&col[c], mt + c * D, sizeof(V));
    sums[c] = V{};
  }
  for (int64_t g = 0; g < len; g += D) {
    V l, oy = col[0] * y[g], ol = col[0] * lam[g];
    std::memcpy(&l, lam + g, sizeof(V));
    sums[0] += l * y[g];
    for (int c = 1; c < D; ++c) {
      sums[c] += l * y[g + c];
      oy += col[c] * y[g + c];
      ol += col[c] * lam[g + c];
    }
    std::memcpy(y + g, &oy, sizeof(V));
    std::memcpy(lam + g, &ol, sizeof(V));
  }
  for (int c = 0; c < D; ++c)
    for (int r = 0; r < D; ++r) acc[c * D + r] += sums[c][r];
}

template <typename T>
inline void undo_low(T* y, T* lam, int64_t len, const T* mt, int64_t dim, T* acc) {
  if (dim == lanes<T>()) return undo_low_vec(y, lam, len, mt, acc);
  switch (dim) {
    case 4: undo_low_scalar<T, 4>(y, lam, len, mt, acc); break;
    case 2: undo_low_scalar<T, 2>(y, lam, len, mt, acc); break;
    default: break;
  }
}

// Butterflies a' = c a - s b, b' = s a + c b between a[j] and b[j], j < len.
template <typename T>
inline void rotate_pairs(T* __restrict a, T* __restrict b, int64_t len, T c, T s) {
  for (int64_t j = 0; j < len; ++j) {
    const T u = a[j], v = b[j];
    a[j] = c * u - s * v;
    b[j] = s * u + c * v;
  }
}

// Undo (R^T) on (a, b) for the state and for lambda, accumulating lam_b * y_a - lam_a * y_b.
// len is a multiple of lanes<T>() (acc has that many entries).
template <typename T>
inline void undo_pairs(T* __restrict ya, T* __restrict yb, T* __restrict la, T* __restrict lb, int64_t len,
                       T c, T s, T* __restrict acc) {
  constexpr int LANES = lanes<T>();
  for (int64_t j0 = 0; j0 < len; j0 += LANES) {
    for (int l = 0; l < LANES; ++l) {
      const int64_t j = j0 + l;
      const T u = ya[j], v = yb[j], p = la[j], q = lb[j];
      acc[l] += q * u - p * v;
      ya[j] = c * u + s * v;
      yb[j] = c * v - s * u;
      la[j] = c * p + s * q;
      lb[j] = c * q - s * p;
    }
  }
}

// The permutation before a layer: y[i] = x[source(i)]. Either an index array, or the CNOT chain
// CNOT(0,1) CNOT(1,2) ... CNOT(n-2,n-1) computed on the fly (source(i) = i ^ (i << 1), no index
// traffic), or none.
struct Perm {
  const int64_t* index = nullptr;
  bool chain = false;
  int64_t mask = 0;
  bool any() const { return index != nullptr || chain; }
  int64_t source(int64_t i) const { return chain ? (i ^ ((i << 1) & mask)) : index[i]; }
};

template <typename T>
void forward_impl(const T* src, T* dst, const Perm& perm, const Layer<T>& L) {
  at::parallel_for(0, L.ntiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* x = dst + b * L.tile;
      if (perm.chain && L.n > L.kb && L.dim == lanes<T>()) {  // (n > kb: the upper lanes' group exists)
        apply_low_chain(x, src, b * L.tile / L.dim, L.tile / L.dim, perm.mask >> L.kb, L.low);
      } else {
        if (perm.any()) {
          const int64_t base = b * L.tile;
          for (int64_t k = 0; k < L.tile; ++k) x[k] = src[perm.source(base + k)];
        } else if (src != dst) {
          std::copy(src + b * L.tile, src + (b + 1) * L.tile, x);
        }
        apply_low(x, L.tile, L.low, L.dim);
      }
      for (int q = L.kb; q < L.t; ++q) {
        const int64_t h = int64_t(1) << q;
        for (int64_t i0 = 0; i0 < L.tile; i0 += 2 * h) rotate_pairs(x + i0, x + i0 + h, h, L.c[q], L.s[q]);
      }
    }
  });
  if (L.n == L.t) return;
  const int64_t width = std::min(L.tile, STRIP);
  at::parallel_for(0, L.tile / width, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t st = s0; st < s1; ++st) {
      T* base = dst + st * width;
      for (int q = L.t; q < L.n; ++q) {
        const int64_t h = int64_t(1) << (q - L.t);
        for (int64_t r0 = 0; r0 < L.ntiles; r0 += 2 * h)
          for (int64_t r = r0; r < r0 + h; ++r)
            rotate_pairs(base + r * L.tile, base + (r + h) * L.tile, width, L.c[q], L.s[q]);
      }
    }
  });
}

template <typename T>
void backward_impl(T* y, T* lam, T* x, T* lam_x, const Perm& perm, const Layer<T>& L, double* grad) {
  const int64_t width = std::min(L.tile, STRIP);
  const int64_t nstrips = L.n > L.t ? L.tile / width : 0;
  // partial sums: one row of n per strip, then one per tile
  std::vector<double> partial((nstrips + L.ntiles) * L.n, 0.0);
  if (nstrips) {
    at::parallel_for(0, nstrips, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t st = s0; st < s1; ++st) {
        T* yb = y + st * width;
        T* lb = lam + st * width;
        for (int q = L.t; q < L.n; ++q) {
          const int64_t h = int64_t(1) << (q - L.t);
          T acc[lanes<T>()] = {};
          for (int64_t r0 = 0; r0 < L.ntiles; r0 += 2 * h)
            for (int64_t r = r0; r < r0 + h; ++r)
              undo_pairs(yb + r * L.tile, yb + (r + h) * L.tile, lb + r * L.tile, lb + (r + h) * L.tile, width,
                         L.c[q], L.s[q], acc);
          double sum = 0;
          for (int l = 0; l < lanes<T>(); ++l) sum += acc[l];
          partial[st * L.n + q] = sum;
        }
      }
    });
  }
  at::parallel_for(0, L.ntiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* yt = y + b * L.tile;
      T* lt = lam + b * L.tile;
      double* part = partial.data() + (nstrips + b) * L.n;
      for (int q = L.t - 1; q >= L.kb; --q) {
        const int64_t h = int64_t(1) << q;
        T acc[lanes<T>()] = {};
        for (int64_t i0 = 0; i0 < L.tile; i0 += 2 * h)
          undo_pairs(yt + i0, yt + i0 + h, lt + i0, lt + i0 + h, h, L.c[q], L.s[q], acc);
        double sum = 0;
        for (int l = 0; l < lanes<T>(); ++l) sum += acc[l];
        part[q] = sum;
      }
      T acc[64] = {};
      undo_low(yt, lt, L.tile, L.low_t, L.dim, acc);
      // <lam, J_q y> = sum over rows r of sign * acc[r][r ^ 2^q], sign = +1 where bit q of r is 1
      for (int q = 0; q < L.kb; ++q) {
        double sum = 0;
        for (int64_t r = 0; r < L.dim; ++r) {
          const int64_t col = r ^ (int64_t(1) << q);
          const double v = acc[col * L.dim + r];
          sum += ((r >> q) & 1) ? v : -v;
        }
        part[q] = sum;
      }
      // the forward gathered x at source(i): scatter back (a bijection: no two writes collide)
      if (perm.chain && L.n > L.kb && L.dim == lanes<T>()) {
        constexpr int D = lanes<T>();
        const int64_t group_mask = perm.mask >> L.kb;
        for (int64_t k = 0; k < L.tile; k += D) {
          const int64_t a = (b * L.tile + k) / D, g = a ^ ((a << 1) & group_mask);
          T* x0 = x + D * g;
          T* x1 = x + D * (g ^ 1);
          T* l0 = lam_x + D * g;
          T* l1 = lam_x + D * (g ^ 1);
          for (int r = 0; r < D / 2; ++r) {
            x0[chain_offset<T>(r)] = yt[k + r];
            l0[chain_offset<T>(r)] = lt[k + r];
          }
          for (int r = D / 2; r < D; ++r) {
            x1[chain_offset<T>(r)] = yt[k + r];
            l1[chain_offset<T>(r)] = lt[k + r];
          }
        }
      } else if (perm.any()) {
        const int64_t base = b * L.tile;
        for (int64_t k = 0; k < L.tile; ++k) {
          const int64_t j = perm.source(base + k);
          x[j] = yt[k];
          lam_x[j] = lt[k];
        }
      }
    }
  });
  for (int q = 0; q < L.n; ++q) grad[q] = 0;
  for (int64_t row = 0; row < nstrips + L.ntiles; ++row)
    for (int q = 0; q < L.n; ++q) grad[q] += partial[row * L.n + q];
  for (int q = 0; q < L.n; ++q) grad[q] *= 0.5;
}

Perm make_perm(const c10::optional<torch::Tensor>& perm, bool chain, int64_t size) {
  Perm p;
  if (chain) {
    p.chain = true;
    p.mask = size - 1;
  } else if (perm.has_value()) {
    p.index = perm->data_ptr<int64_t>();
  }
  return p;
}

void check(const torch::Tensor& state, const c10::optional<torch::Tensor>& perm, const torch::Tensor& c,
           const torch::Tensor& s) {
  TORCH_CHECK(state.device().is_cpu() && state.dim() == 1 && state.is_contiguous(), "state: contiguous 1-D CPU tensor");
  const int64_t n = c.numel();
  TORCH_CHECK(n >= 1 && n <= 40 && state.numel() == (int64_t(1) << n), "state must have 2^n amplitudes for n angles");
  TORCH_CHECK(c.scalar_type() == state.scalar_type() && s.scalar_type() == state.scalar_type() && s.numel() == n &&
              c.is_contiguous() && s.is_contiguous(), "cos/sin: contiguous, n values of the state's dtype");
  if (perm.has_value())
    TORCH_CHECK(perm->scalar_type() == torch::kInt64 && perm->is_contiguous() && perm->numel() == state.numel(),
                "perm: contiguous int64 permutation of the basis indices");
}

}  // namespace

// out: a buffer of the state's size and dtype (not the state itself): reusing buffers across layers
// avoids page-faulting fresh memory in every layer.
torch::Tensor ry_layer_forward(torch::Tensor state, c10::optional<torch::Tensor> perm, bool chain, torch::Tensor c,
                               torch::Tensor s, torch::Tensor out) {
  check(state, perm, c, s);
  check(out, perm, c, s);
  TORCH_CHECK(out.data_ptr() != state.data_ptr(), "out must not be the input state");
  const Perm p = make_perm(perm, chain, state.numel());
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "ry_layer_forward", [&] {
    Layer<scalar_t> layer(static_cast<int>(c.numel()), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>());
    forward_impl<scalar_t>(state.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), p, layer);
  });
  return out;
}

// Consumes y and lam (overwritten). With a permutation the layer's input and its gradient are written
// to x_out and lam_out (buffers distinct from y and lam); without one they are y and lam themselves.
// Returns (x, lam_x, dL/dtheta as float64).
std::vector<torch::Tensor> ry_layer_backward(torch::Tensor y, torch::Tensor lam, c10::optional<torch::Tensor> perm,
                                             bool chain, torch::Tensor c, torch::Tensor s, torch::Tensor x_out,
                                             torch::Tensor lam_out) {
  check(y, perm, c, s);
  check(lam, perm, c, s);
  const Perm p = make_perm(perm, chain, y.numel());
  auto grad = torch::empty({c.numel()}, torch::dtype(torch::kFloat64));
  torch::Tensor x = y, lam_x = lam;
  if (p.any()) {
    check(x_out, perm, c, s);
    check(lam_out, perm, c, s);
    TORCH_CHECK(x_out.data_ptr() != y.data_ptr() && x_out.data_ptr() != lam.data_ptr() &&
                lam_out.data_ptr() != y.data_ptr() && lam_out.data_ptr() != lam.data_ptr() &&
                x_out.data_ptr() != lam_out.data_ptr(), "x_out and lam_out must be two other buffers");
    x = x_out;
    lam_x = lam_out;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "ry_layer_backward", [&] {
    Layer<scalar_t> layer(static_cast<int>(c.numel()), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>());
    backward_impl<scalar_t>(y.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                            lam_x.data_ptr<scalar_t>(), p, layer, grad.data_ptr<double>());
  });
  return {x, lam_x, grad};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ry_layer_forward", &ry_layer_forward,
        "gather by perm (an index, or chain=True for the CNOT chain, or neither), then RY on every qubit");
  m.def("ry_layer_backward", &ry_layer_backward, "undo a layer in place; returns (x, dL/dx, dL/dtheta)");
}
