// Fused CPU kernels for full RY layers of a real-amplitude statevector (see peft_qpa/fused_kernel.py).
//
// Forward, one layer: a gather of the state by a permutation (the CNOT chain before the layer, or an
// index, or none), then RY(theta_q) on every qubit q (qubit q is bit q of a basis index, Qiskit's
// little-endian order). The layer's rotations commute, so they are applied in the order that suits
// the memory, one 32-byte SIMD register (8 floats / 4 doubles) at a time:
//   tiles (QPA_TILE_BYTES, in L1), per register: the gather (the CNOT chain is two register loads and
//          one two-source shuffle; no index is read), then the qubits inside the register ("lane"
//          qubits: 3 for float, 2 for double) by in-register shuffles; then the other qubits of the
//          tile, three at a time (8 registers loaded, turned, stored);
//   blocks (QPA_BLOCK_BYTES, 8 tiles, in L2): the next three qubits while the block is in cache;
//   high passes: the qubits above a block, three at a time over the whole state.
// Each rotation costs one FMA per amplitude (RY = sigma U, see Layer). Register blocking keeps loads
// and stores at a third of the butterflies.
//
// Backward (adjoint), one layer: given z = P y (the output of the layer, still permuted by the
// permutation P that follows it; P = identity for the last layer without one) and mu = P lambda, it
// gathers y = P^-1 z and lambda = P^-1 mu (P^-1 of the chain is a prefix XOR: again two loads and a
// shuffle per register, instead of a scatter), undoes the layer (U^T on every qubit) and returns
// dL/dtheta. Because the layer's rotations commute and RY'(theta) = J RY(theta) / 2 with J = RY(pi),
// which commutes with every rotation of the layer, dL/dtheta_q = <lambda, J_q y> / 2 can be contracted
// at any point of the undo, from the values at hand. Partial sums (per tile, block and chunk of a high
// pass) are added in a fixed order, so results do not depend on the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

#ifndef QPA_TILE_BYTES
#define QPA_TILE_BYTES 16384
#endif
#ifndef QPA_BLOCK_BYTES
#define QPA_BLOCK_BYTES 131072
#endif

template <typename T> struct Simd;
template <> struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t M __attribute__((vector_size(32)));
  static constexpr int lanes = 8, lane_bits = 3;
};
template <> struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t M __attribute__((vector_size(32)));
  static constexpr int lanes = 4, lane_bits = 2;
};

// Tiles of QPA_TILE_BYTES (in L1): qubits below tile_bits are rotated inside a tile. Blocks of
// QPA_BLOCK_BYTES (in L2; at most 8 tiles): the qubits from tile_bits to block_bits in one more pass
// over the block while it is in L2. Powers of two.
template <typename T> constexpr int bits_for(int64_t bytes) {
  int bits = 0;
  while ((int64_t(1) << (bits + 1)) * int64_t(sizeof(T)) <= bytes) ++bits;
  return bits;
}
template <typename T> constexpr int tile_bits() { return bits_for<T>(QPA_TILE_BYTES); }
template <typename T> constexpr int block_bits() { return std::min(bits_for<T>(QPA_BLOCK_BYTES), tile_bits<T>() + 3); }

// The grain of at::parallel_for that splits `range` items over at most `threads` threads (0: torch's
// pool). With 1 the pass runs in the calling thread: no parallel region, no barrier at its end, which
// is what a pass costs under CPU contention (a descheduled team member stalls every pass).
inline int64_t grain_for(int64_t range, int64_t threads, int64_t minimum = 1) {
  if (threads <= 0) return minimum;
  return std::max(minimum, (range + threads - 1) / threads);
}

template <typename T>
inline typename Simd<T>::V vload(const T* p) {
  typename Simd<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename Simd<T>::V v) { std::memcpy(p, &v, sizeof(v)); }

// ------------------------------------------------------------------------------------------------
// In-register shuffles (compile-time masks)
// ------------------------------------------------------------------------------------------------

// Lane partner under qubit q (q < lane_bits): v[r ^ 2^q].
inline Simd<float>::V swap_lanes(Simd<float>::V v, int q) {
  typedef Simd<float>::M M;
  if (q == 0) return __builtin_shuffle(v, M{1, 0, 3, 2, 5, 4, 7, 6});
  if (q == 1) return __builtin_shuffle(v, M{2, 3, 0, 1, 6, 7, 4, 5});
  return __builtin_shuffle(v, M{4, 5, 6, 7, 0, 1, 2, 3});
}
inline Simd<double>::V swap_lanes(Simd<double>::V v, int q) {
  typedef Simd<double>::M M;
  if (q == 0) return __builtin_shuffle(v, M{1, 0, 3, 2});
  return __builtin_shuffle(v, M{2, 3, 0, 1});
}

// The CNOT chain CNOT(0,1) CNOT(1,2) ... gathers y[i] = x[i ^ (i << 1)]. For register a (lanes
// i = D a + r) the sources are registers g = a ^ (a << 1) (lanes of the lower half) and g ^ 1 (upper
// half), lane r ^ (r << 1) mod D.
inline Simd<float>::V chain_shuffle(Simd<float>::V lo, Simd<float>::V hi) {
  return __builtin_shuffle(lo, hi, Simd<float>::M{0, 3, 6, 5, 12, 15, 10, 9});
}
inline Simd<double>::V chain_shuffle(Simd<double>::V lo, Simd<double>::V hi) {
  return __builtin_shuffle(lo, hi, Simd<double>::M{0, 3, 6, 5});
}
// Its inverse x[j] = y[prefix_xor(j)] (bit k of prefix_xor(j) = j_0 ^ ... ^ j_k): lanes of even
// parity read register prefix_xor(a), lanes of odd parity prefix_xor(a) ^ (all register bits), lane
// prefix_xor(r).
inline Simd<float>::V inverse_chain_shuffle(Simd<float>::V even, Simd<float>::V odd) {
  return __builtin_shuffle(even, odd, Simd<float>::M{0, 15, 14, 1, 12, 3, 2, 13});
}
inline Simd<double>::V inverse_chain_shuffle(Simd<double>::V even, Simd<double>::V odd) {
  return __builtin_shuffle(even, odd, Simd<double>::M{0, 7, 6, 1});
}

inline int64_t prefix_xor(int64_t a) {
  for (int shift = 1; shift < 64; shift <<= 1) a ^= a << shift;
  return a;
}

// ------------------------------------------------------------------------------------------------
// The permutation before a gather
// ------------------------------------------------------------------------------------------------

enum class Gather { none, chain, inverse_chain, index };

struct Perm {
  Gather kind = Gather::none;
  const int64_t* index = nullptr;  // kind == index: y[i] = x[index[i]]
  int64_t mask = 0;                // size - 1
  int64_t source(int64_t i) const {
    switch (kind) {
      case Gather::chain: return i ^ ((i << 1) & mask);
      case Gather::inverse_chain: return prefix_xor(i) & mask;
      case Gather::index: return index[i];
      default: return i;
    }
  }
};

// Register a of the gathered state (lanes D a .. D a + D - 1).
template <typename T>
inline typename Simd<T>::V gather_register(const T* src, int64_t a, const Perm& p) {
  constexpr int D = Simd<T>::lanes, K = Simd<T>::lane_bits;
  const int64_t groups = p.mask >> K;
  switch (p.kind) {
    case Gather::chain: {
      const int64_t g = a ^ ((a << 1) & groups);
      return chain_shuffle(vload(src + D * g), vload(src + D * (g ^ 1)));
    }
    case Gather::inverse_chain: {
      const int64_t g = prefix_xor(a) & groups;
      return inverse_chain_shuffle(vload(src + D * g), vload(src + D * (g ^ groups)));
    }
    case Gather::index: {
      typename Simd<T>::V v;
      for (int r = 0; r < D; ++r) v[r] = src[p.index[D * a + r]];
      return v;
    }
    default: return vload(src + D * a);
  }
}

// The two source tiles (of `tile` amplitudes) that output tile b gathers from, or false for an index
// or no permutation. Chain: the tile of register g = a ^ (a << 1) and its neighbour; inverse chain:
// the tile of prefix_xor(a) and its mirror (all tile bits flipped).
template <typename T>
inline bool source_tiles(const Perm& p, int64_t b, int64_t tile, int64_t* first, int64_t* second) {
  constexpr int D = Simd<T>::lanes, K = Simd<T>::lane_bits;
  const int64_t groups = p.mask >> K, per_tile = tile / D, a = b * per_tile;
  const int64_t last_tile = (p.mask + 1) / tile - 1;
  if (p.kind == Gather::chain) {
    *first = ((a ^ (a << 1)) & groups) / per_tile;
    *second = *first ^ 1;
  } else if (p.kind == Gather::inverse_chain) {
    *first = (prefix_xor(a) & groups) / per_tile;
    *second = *first ^ last_tile;
  } else {
    return false;
  }
  return last_tile > 0;
}

// ------------------------------------------------------------------------------------------------
// A layer's coefficients
// ------------------------------------------------------------------------------------------------
//
// RY(theta) = sigma U, with a factor sigma taken out so that U costs one FMA per amplitude:
//   form A (|cos| >= |sin|): sigma = cos, U = [[1, -t], [t, 1]], t = tan(theta/2), |t| <= 1;
//   form B (|sin| >  |cos|): sigma = sin, U = [[k, -1], [1, k]], k = cot(theta/2), |k| < 1.
// A layer multiplies once by the product of its sigmas (at least 2^(-n/2) in magnitude; applied first,
// so values only shrink on the way and nothing overflows) and then applies every U: half the
// arithmetic of the plain rotation. The backward undoes with U^T ([[1, t], [-t, 1]] or
// [[k, 1], [-1, k]]) after the same first multiplication; its values at a stage are then the true ones
// times kappa = the product of the sigmas of the qubits not undone yet, so a gradient contracted
// there is divided by kappa^2.

template <typename T>
struct Layer {
  typedef typename Simd<T>::V V;
  int n, t, t2;  // qubits, tile qubits, block qubits
  int64_t size, tile, ntiles, block, nblocks;
  T m[64];          // t or k of each qubit
  int64_t forms;    // bit q set: qubit q in form B
  double tail[65];  // tail[q]: product of the sigmas of qubits q..n-1
  T scale;          // tail[0]
  V lane_a[3], lane_b[3];  // lane qubit q: v' = A v + B (.) v[r ^ 2^q]; undo: A v - B (.) v[r ^ 2^q]
  V lane_sign[3];          // +1 where bit q of the lane is 1, else -1
  int64_t threads = 0;     // at most this many threads per pass (0: torch's intra-op pool)

  Layer(int n_, const T* c, const T* s) : n(n_) {
    t = std::min(n, tile_bits<T>());
    t2 = std::min(n, block_bits<T>());
    size = int64_t(1) << n;
    tile = int64_t(1) << t;
    ntiles = int64_t(1) << (n - t);
    block = int64_t(1) << t2;
    nblocks = int64_t(1) << (n - t2);
    forms = 0;
    double sigma[64];
    for (int q = 0; q < n; ++q) {
      const bool b_form = std::abs(double(s[q])) > std::abs(double(c[q]));
      sigma[q] = b_form ? double(s[q]) : double(c[q]);
      m[q] = b_form ? T(double(c[q]) / double(s[q])) : T(double(s[q]) / double(c[q]));
      if (b_form) forms |= int64_t(1) << q;
    }
    tail[n] = 1;
    for (int q = n - 1; q >= 0; --q) tail[q] = tail[q + 1] * sigma[q];
    scale = T(tail[0]);
    for (int q = 0; q < Simd<T>::lane_bits && q < n; ++q)
      for (int r = 0; r < Simd<T>::lanes; ++r) {
        const bool one = (r >> q) & 1, b_form = (forms >> q) & 1;
        lane_a[q][r] = b_form ? m[q] : T(1);
        lane_b[q][r] = (b_form ? T(1) : m[q]) * (one ? T(1) : T(-1));
        lane_sign[q][r] = one ? T(1) : T(-1);
      }
  }
  int group_forms(int q0, int R) const { return int((forms >> q0) & ((int64_t(1) << R) - 1)); }
};

// ------------------------------------------------------------------------------------------------
// Register-blocked butterflies (F: the forms of the block's qubits, bit r for qubit r)
// ------------------------------------------------------------------------------------------------

template <typename V, typename T>
inline void turn(V& a, V& b, T m, bool b_form) {  // (a, b) <- U (a, b)
  if (b_form) {
    const V a2 = m * a - b;
    b = a + m * b;
    a = a2;
  } else {
    const V a2 = a - m * b;
    b = m * a + b;
    a = a2;
  }
}

template <typename V, typename T>
inline void unturn(V& a, V& b, T m, bool b_form) {  // (a, b) <- U^T (a, b)
  if (b_form) {
    const V a2 = m * a + b;
    b = m * b - a;
    a = a2;
  } else {
    const V a2 = a + m * b;
    b = b - m * a;
    a = a2;
  }
}

// U^T on the 2^R registers v for their R qubits (register index bit r = qubit r of the block).
template <int R, int F, typename V, typename T>
inline __attribute__((always_inline)) void unturn_registers(V* v, const T* m) {
#pragma GCC unroll 3
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int k = 0; k < (1 << R); ++k)
      if (!(k & (1 << r))) unturn(v[k], v[k | (1 << r)], m[r], (F >> r) & 1);
  }
}

// Qubits q..q+R-1 at element stride h = 2^q (h >= lanes), on elements [b0 + j, ...) for offsets j in
// [j0, j1): 2^R registers loaded, turned, stored.
template <typename T, int R, int F>
inline void rotate_block(T* x, int64_t h, int64_t b0, int64_t j0, int64_t j1, const T* m) {
  typedef typename Simd<T>::V V;
  constexpr int K = 1 << R;
  for (int64_t j = j0; j < j1; j += Simd<T>::lanes) {
    T* p = x + b0 + j;
    V v[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) v[k] = vload(p + k * h);
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k)
        if (!(k & (1 << r))) turn(v[k], v[k | (1 << r)], m[r], (F >> r) & 1);
    }
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) vstore(p + k * h, v[k]);
  }
}

// Undo of R <= 2 qubits on y and lambda together, contracting lam_b y_a - lam_a y_b per qubit into acc
// before that qubit is undone.
template <typename T, int R, int F>
inline void undo_block(T* y, T* lam, int64_t h, int64_t b0, int64_t j0, int64_t j1, const T* m,
                       typename Simd<T>::V* acc) {
  typedef typename Simd<T>::V V;
  constexpr int K = 1 << R;
  for (int64_t j = j0; j < j1; j += Simd<T>::lanes) {
    T* py = y + b0 + j;
    T* pl = lam + b0 + j;
    V vy[K], vl[K];
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      vy[k] = vload(py + k * h);
      vl[k] = vload(pl + k * h);
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) {
        if (k & (1 << r)) continue;
        const int k1 = k | (1 << r);
        acc[r] += vl[k1] * vy[k] - vl[k] * vy[k1];
        unturn(vy[k], vy[k1], m[r], (F >> r) & 1);
        unturn(vl[k], vl[k1], m[r], (F >> r) & 1);
      }
    }
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      vstore(py + k * h, vy[k]);
      vstore(pl + k * h, vl[k]);
    }
  }
}

// Three qubits at a time for y and lambda together would need 16 data registers of the 16 there
// are: the block loads y (8 registers), contracts the three qubits' gradients with lambda read from L1
// on the fly (all three at the block's entry stage), undoes y and stores it, then undoes lambda in the
// same 8 registers. Three qubits per pass over memory instead of two.
template <typename T, int R, int F>
inline void undo_block3(T* y, T* lam, int64_t h, int64_t b0, int64_t j0, int64_t j1, const T* m,
                        typename Simd<T>::V* acc) {
  static_assert(R == 3, "three qubits");
  typedef typename Simd<T>::V V;
  for (int64_t j = j0; j < j1; j += Simd<T>::lanes) {
    T* py = y + b0 + j;
    T* pl = lam + b0 + j;
    V v[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) v[k] = vload(py + k * h);
#pragma GCC unroll 3
    for (int r = 0; r < 3; ++r) {
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        if (k & (1 << r)) continue;
        const int k1 = k | (1 << r);
        acc[r] += vload(pl + k1 * h) * v[k] - vload(pl + k * h) * v[k1];
      }
    }
    unturn_registers<3, F>(v, m);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      vstore(py + k * h, v[k]);
      v[k] = vload(pl + k * h);
    }
    unturn_registers<3, F>(v, m);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) vstore(pl + k * h, v[k]);
  }
}

// The forms are known per layer only: one instantiation per combination, picked at run time.
template <typename T, int R, int F = 0>
inline void rotate_forms(int forms, T* x, int64_t h, int64_t b0, int64_t j0, int64_t j1, const T* m) {
  if constexpr (F + 1 < (1 << R))
    if (forms != F) return rotate_forms<T, R, F + 1>(forms, x, h, b0, j0, j1, m);
  rotate_block<T, R, F>(x, h, b0, j0, j1, m);
}

template <typename T, int R, int F = 0>
inline void undo_forms(int forms, T* y, T* lam, int64_t h, int64_t b0, int64_t j0, int64_t j1, const T* m,
                       typename Simd<T>::V* acc) {
  if constexpr (F + 1 < (1 << R))
    if (forms != F) return undo_forms<T, R, F + 1>(forms, y, lam, h, b0, j0, j1, m, acc);
  if constexpr (R == 3) undo_block3<T, R, F>(y, lam, h, b0, j0, j1, m, acc);
  else undo_block<T, R, F>(y, lam, h, b0, j0, j1, m, acc);
}

// Qubits q0 .. q0 + R - 1 (R <= 3) of the layer at stride h.
template <typename T>
inline void rotate_group(const Layer<T>& L, int q0, int R, T* x, int64_t h, int64_t b0, int64_t j0, int64_t j1) {
  const int f = L.group_forms(q0, R);
  if (R == 3) rotate_forms<T, 3>(f, x, h, b0, j0, j1, L.m + q0);
  else if (R == 2) rotate_forms<T, 2>(f, x, h, b0, j0, j1, L.m + q0);
  else rotate_forms<T, 1>(f, x, h, b0, j0, j1, L.m + q0);
}

template <typename T>
inline void undo_group(const Layer<T>& L, int q0, int R, T* y, T* lam, int64_t h, int64_t b0, int64_t j0, int64_t j1,
                       typename Simd<T>::V* acc) {
  const int f = L.group_forms(q0, R);
  if (R == 3) undo_forms<T, 3>(f, y, lam, h, b0, j0, j1, L.m + q0, acc);
  else if (R == 2) undo_forms<T, 2>(f, y, lam, h, b0, j0, j1, L.m + q0, acc);
  else undo_forms<T, 1>(f, y, lam, h, b0, j0, j1, L.m + q0, acc);
}

// Qubits q0 .. q0 + count - 1 in groups of up to three (the last one smaller): fn(first qubit, R).
// Every pass over qubits, forward and backward, groups them this way.
template <typename F>
inline __attribute__((always_inline)) void for_groups(int q0, int count, F&& fn) {
  for (int done = 0; done < count;) {
    const int R = std::min(3, count - done);
    fn(q0 + done, R);
    done += R;
  }
}

// The stage at which each qubit's gradient is contracted (see Layer): a lane qubit at its own; in a
// group of three (undo_block3) all three at the group's first qubit; otherwise each at its own.
template <typename T>
inline void contraction_stages(const Layer<T>& L, int* stage) {
  const int K = Simd<T>::lane_bits;
  for (int q = 0; q < K; ++q) stage[q] = q;
  const auto mark = [&](int q0, int R) {
    for (int r = 0; r < R; ++r) stage[q0 + r] = R == 3 ? q0 : q0 + r;
  };
  for_groups(K, L.t - K, mark);
  for_groups(L.t, L.t2 - L.t, mark);
  for_groups(L.t2, L.n - L.t2, mark);
}

template <typename T>
inline double lane_sum(typename Simd<T>::V v) {
  double sum = 0;
  for (int r = 0; r < Simd<T>::lanes; ++r) sum += v[r];
  return sum;
}

// Qubits q0..q0+count-1 of a contiguous span of len elements (h0 = 2^(q0 - first qubit of the span)).
template <typename T>
inline void rotate_qubits(const Layer<T>& L, T* x, int64_t len, int64_t h0, int q0, int count) {
  for_groups(q0, count, [&](int q, int R) __attribute__((always_inline)) {
    const int64_t h = h0 << (q - q0);
    for (int64_t b0 = 0; b0 < len; b0 += h << R) rotate_group(L, q, R, x, h, b0, 0, h);
  });
}

template <typename T>
inline void undo_qubits(const Layer<T>& L, T* y, T* lam, int64_t len, int64_t h0, int q0, int count, double* sums) {
  typedef typename Simd<T>::V V;
  for_groups(q0, count, [&](int q, int R) {
    const int64_t h = h0 << (q - q0);
    V acc[3] = {V{}, V{}, V{}};
    for (int64_t b0 = 0; b0 < len; b0 += h << R) undo_group(L, q, R, y, lam, h, b0, 0, h, acc);
    for (int r = 0; r < R; ++r) sums[q + r] = lane_sum<T>(acc[r]);
  });
}

// High passes: qubits t2..n-1 over the whole state, R at a time, in chunks of one tile per register
// of the group (chunk k: base b0 and offsets [j0, j0 + tile)), run in parallel.
template <typename T, typename F>
inline void for_high_chunks(const Layer<T>& L, int R, int64_t h, F&& fn) {
  const int64_t per_base = h / L.tile;  // chunks per base
  const int64_t chunks = L.size / (L.tile << R);
  at::parallel_for(0, chunks, grain_for(chunks, L.threads), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b0 = (k / per_base) * (h << R), j0 = (k % per_base) * L.tile;
      fn(k, b0, j0, j0 + L.tile);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Layers
// ------------------------------------------------------------------------------------------------

template <typename T>
void forward_impl(const T* src, T* dst, const Perm& perm, const Layer<T>& L) {
  typedef typename Simd<T>::V V;
  constexpr int D = Simd<T>::lanes, K = Simd<T>::lane_bits;
  at::parallel_for(0, L.nblocks, grain_for(L.nblocks, L.threads), [&](int64_t B0, int64_t B1) {
    for (int64_t B = B0; B < B1; ++B) {
      for (int64_t b = B * (L.block / L.tile); b < (B + 1) * (L.block / L.tile); ++b) {
        T* x = dst + b * L.tile;
        const int64_t a0 = b * L.tile / D;
        for (int64_t a = a0; a < a0 + L.tile / D; ++a) {
          V v = gather_register(src, a, perm) * L.scale;
#pragma GCC unroll 3
          for (int q = 0; q < K; ++q) v = L.lane_a[q] * v + L.lane_b[q] * swap_lanes(v, q);
          vstore(x + D * (a - a0), v);
        }
        rotate_qubits(L, x, L.tile, D, K, L.t - K);
      }
      rotate_qubits(L, dst + B * L.block, L.block, L.tile, L.t, L.t2 - L.t);
    }
  });
  for_groups(L.t2, L.n - L.t2, [&](int q, int R) {
    const int64_t h = int64_t(1) << q;
    for_high_chunks(L, R, h, [&](int64_t, int64_t b0, int64_t j0, int64_t j1) {
      rotate_group(L, q, R, dst, h, b0, j0, j1);
    });
  });
}

template <typename T>
void backward_impl(const T* z, const T* mu, T* y, T* lam, const Perm& perm, const Layer<T>& L, double* grad) {
  typedef typename Simd<T>::V V;
  constexpr int D = Simd<T>::lanes, K = Simd<T>::lane_bits;
  // partial sums: one row of n per tile (the qubits below t), one per block (t..t2-1), then one per
  // chunk of each high pass
  std::vector<double> tile_part(L.ntiles * L.n, 0.0), block_part(L.nblocks * L.n, 0.0);
  at::parallel_for(0, L.nblocks, grain_for(L.nblocks, L.threads), [&](int64_t B0, int64_t B1) {
    for (int64_t B = B0; B < B1; ++B) {
      for (int64_t b = B * (L.block / L.tile); b < (B + 1) * (L.block / L.tile); ++b) {
        T* yt = y + b * L.tile;
        T* lt = lam + b * L.tile;
        const int64_t a0 = b * L.tile / D;
        V acc[3] = {V{}, V{}, V{}};
        // The gather reads its two source tiles in a scrambled order, which the hardware prefetcher
        // does not follow (the inverse chain's sources jump across the state): fetch the next tile's
        // sources into L2 meanwhile, a cache line per two registers of each of the four streams.
        int64_t s0 = 0, s1 = 0;
        const bool prefetch = b + 1 < B1 * (L.block / L.tile) && source_tiles<T>(perm, b + 1, L.tile, &s0, &s1);
        const char* pf[4] = {reinterpret_cast<const char*>(z + s0 * L.tile), reinterpret_cast<const char*>(z + s1 * L.tile),
                             reinterpret_cast<const char*>(mu + s0 * L.tile), reinterpret_cast<const char*>(mu + s1 * L.tile)};
        for (int64_t a = a0; a < a0 + L.tile / D; ++a) {
          if (prefetch && !((a - a0) & 1))
            for (const char* p : pf) __builtin_prefetch(p + (a - a0) * 32, 0, 2);
          V vy = gather_register(z, a, perm) * L.scale, vl = gather_register(mu, a, perm) * L.scale;
#pragma GCC unroll 3
          for (int q = 0; q < K; ++q) {
            const V sy = swap_lanes(vy, q), sl = swap_lanes(vl, q);
            acc[q] += vl * sy;
            vy = L.lane_a[q] * vy - L.lane_b[q] * sy;
            vl = L.lane_a[q] * vl - L.lane_b[q] * sl;
          }
          vstore(yt + D * (a - a0), vy);
          vstore(lt + D * (a - a0), vl);
        }
        double* part = tile_part.data() + b * L.n;
        for (int q = 0; q < K; ++q) part[q] = lane_sum<T>(acc[q] * L.lane_sign[q]);
        undo_qubits(L, yt, lt, L.tile, D, K, L.t - K, part);
      }
      undo_qubits(L, y + B * L.block, lam + B * L.block, L.block, L.tile, L.t, L.t2 - L.t,
                  block_part.data() + B * L.n);
    }
  });
  struct HighPart {
    int q, R;                  // the group's qubits
    std::vector<double> sums;  // R per chunk
  };
  std::vector<HighPart> high_parts;
  for_groups(L.t2, L.n - L.t2, [&](int q, int R) {
    const int64_t h = int64_t(1) << q;
    high_parts.push_back({q, R, std::vector<double>((L.size / (L.tile << R)) * R, 0.0)});
    double* part = high_parts.back().sums.data();
    for_high_chunks(L, R, h, [&](int64_t k, int64_t b0, int64_t j0, int64_t j1) {
      V acc[3] = {V{}, V{}, V{}};
      undo_group(L, q, R, y, lam, h, b0, j0, j1, acc);
      for (int r = 0; r < R; ++r) part[k * R + r] = lane_sum<T>(acc[r]);
    });
  });
  for (int q = 0; q < L.n; ++q) grad[q] = 0;
  for (int64_t b = 0; b < L.ntiles; ++b)
    for (int q = 0; q < L.t; ++q) grad[q] += tile_part[b * L.n + q];
  for (int64_t B = 0; B < L.nblocks; ++B)
    for (int q = L.t; q < L.t2; ++q) grad[q] += block_part[B * L.n + q];
  for (const HighPart& hp : high_parts)
    for (size_t k = 0; k < hp.sums.size() / hp.R; ++k)
      for (int r = 0; r < hp.R; ++r) grad[hp.q + r] += hp.sums[k * hp.R + r];
  int stage[64];
  contraction_stages(L, stage);
  for (int q = 0; q < L.n; ++q) {
    const double kappa = L.tail[stage[q]];
    grad[q] *= 0.5 / (kappa * kappa);
  }
}

// States smaller than two registers (n <= lane_bits): plain loops, in double.
template <typename T>
void forward_small(const T* src, T* dst, const Perm& perm, int n, const T* c, const T* s) {
  const int64_t size = int64_t(1) << n;
  std::vector<double> x(size);
  for (int64_t i = 0; i < size; ++i) x[i] = src[perm.source(i)];
  for (int q = 0; q < n; ++q) {
    const int64_t h = int64_t(1) << q;
    for (int64_t i = 0; i < size; ++i)
      if (!(i & h)) {
        const double a = x[i], b = x[i | h];
        x[i] = c[q] * a - s[q] * b;
        x[i | h] = s[q] * a + c[q] * b;
      }
  }
  for (int64_t i = 0; i < size; ++i) dst[i] = T(x[i]);
}

template <typename T>
void backward_small(const T* z, const T* mu, T* y, T* lam, const Perm& perm, int n, const T* c, const T* s,
                    double* grad) {
  const int64_t size = int64_t(1) << n;
  std::vector<double> u(size), l(size);
  for (int64_t i = 0; i < size; ++i) {
    u[i] = z[perm.source(i)];
    l[i] = mu[perm.source(i)];
  }
  for (int q = 0; q < n; ++q) {
    const int64_t h = int64_t(1) << q;
    double sum = 0;
    for (int64_t i = 0; i < size; ++i)
      if (!(i & h)) {
        const double a = u[i], b = u[i | h], p = l[i], w = l[i | h];
        sum += w * a - p * b;
        u[i] = c[q] * a + s[q] * b;
        u[i | h] = c[q] * b - s[q] * a;
        l[i] = c[q] * p + s[q] * w;
        l[i | h] = c[q] * w - s[q] * p;
      }
    grad[q] = 0.5 * sum;
  }
  for (int64_t i = 0; i < size; ++i) {
    y[i] = T(u[i]);
    lam[i] = T(l[i]);
  }
}

Perm make_perm(const c10::optional<torch::Tensor>& index, Gather computed, int64_t size) {
  Perm p;
  p.mask = size - 1;
  if (computed != Gather::none) p.kind = computed;
  else if (index.has_value()) {
    p.kind = Gather::index;
    p.index = index->data_ptr<int64_t>();
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

bool aliases(const torch::Tensor& a, const torch::Tensor& b) { return a.data_ptr() == b.data_ptr(); }

}  // namespace

// out: a buffer of the state's size and dtype (not the state itself): reusing buffers across layers
// avoids page-faulting fresh memory in every layer. chain=True: the CNOT chain (perm must be None).
torch::Tensor ry_layer_forward(torch::Tensor state, c10::optional<torch::Tensor> perm, bool chain, torch::Tensor c,
                               torch::Tensor s, torch::Tensor out, int64_t threads) {
  check(state, perm, c, s);
  check(out, perm, c, s);
  TORCH_CHECK(!aliases(out, state), "out must not be the input state");
  const Perm p = make_perm(perm, chain ? Gather::chain : Gather::none, state.numel());
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "ry_layer_forward", [&] {
    const int n = static_cast<int>(c.numel());
    if (n <= Simd<scalar_t>::lane_bits) {
      forward_small<scalar_t>(state.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), p, n, c.data_ptr<scalar_t>(),
                              s.data_ptr<scalar_t>());
    } else {
      Layer<scalar_t> layer(n, c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>());
      layer.threads = threads;
      forward_impl<scalar_t>(state.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), p, layer);
    }
  });
  return out;
}

// z, mu: the layer's output and its gradient, both still permuted by the permutation that follows the
// layer (inverse: the index of its inverse, or inverse_chain=True for the CNOT chain, or neither).
// Writes the layer's input and its gradient to y_out, lam_out and returns dL/dtheta (float64).
// Without a permutation y_out, lam_out may be z, mu themselves (in place); with one they must be two
// other buffers.
torch::Tensor ry_layer_backward(torch::Tensor z, torch::Tensor mu, c10::optional<torch::Tensor> inverse,
                                bool inverse_chain, torch::Tensor c, torch::Tensor s, torch::Tensor y_out,
                                torch::Tensor lam_out, int64_t threads) {
  check(z, inverse, c, s);
  check(mu, inverse, c, s);
  check(y_out, inverse, c, s);
  check(lam_out, inverse, c, s);
  const Perm p = make_perm(inverse, inverse_chain ? Gather::inverse_chain : Gather::none, z.numel());
  TORCH_CHECK(!aliases(y_out, lam_out) && !aliases(z, mu), "the state and its gradient need two buffers");
  if (p.kind != Gather::none) {
    TORCH_CHECK(!aliases(y_out, z) && !aliases(y_out, mu) && !aliases(lam_out, z) && !aliases(lam_out, mu),
                "with a permutation, y_out and lam_out must be two other buffers than z and mu");
  } else {
    TORCH_CHECK(!aliases(y_out, mu) && !aliases(lam_out, z), "y_out and lam_out must be z and mu or other buffers");
  }
  auto grad = torch::empty({c.numel()}, torch::dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ry_layer_backward", [&] {
    const int n = static_cast<int>(c.numel());
    if (n <= Simd<scalar_t>::lane_bits) {
      backward_small<scalar_t>(z.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), y_out.data_ptr<scalar_t>(),
                               lam_out.data_ptr<scalar_t>(), p, n, c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                               grad.data_ptr<double>());
    } else {
      Layer<scalar_t> layer(n, c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>());
      layer.threads = threads;
      backward_impl<scalar_t>(z.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), y_out.data_ptr<scalar_t>(),
                              lam_out.data_ptr<scalar_t>(), p, layer, grad.data_ptr<double>());
    }
  });
  return grad;
}

// out[i] = state[perm(i)] for a lone permutation (the CNOT chain after the last layer): the chain is
// computed (two loads and a shuffle per register), an index is read.
torch::Tensor permute(torch::Tensor state, c10::optional<torch::Tensor> perm, bool chain, torch::Tensor out,
                      int64_t threads) {
  TORCH_CHECK(state.device().is_cpu() && state.dim() == 1 && state.is_contiguous() && out.is_contiguous() &&
              out.numel() == state.numel() && out.scalar_type() == state.scalar_type() && !aliases(out, state),
              "permute: contiguous 1-D CPU state and another buffer of its size and dtype");
  const int64_t size = state.numel();
  TORCH_CHECK(size >= 1 && (size & (size - 1)) == 0, "permute: the state must have 2^n amplitudes");
  if (perm.has_value())
    TORCH_CHECK(perm->scalar_type() == torch::kInt64 && perm->is_contiguous() && perm->numel() == size,
                "perm: contiguous int64 permutation of the basis indices");
  const Perm p = make_perm(perm, chain ? Gather::chain : Gather::none, size);
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "permute", [&] {
    const scalar_t* src = state.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    constexpr int D = Simd<scalar_t>::lanes;
    if (size <= D) {
      for (int64_t i = 0; i < size; ++i) dst[i] = src[p.source(i)];
      return;
    }
    at::parallel_for(0, size / D, grain_for(size / D, threads, 4096), [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) vstore(dst + D * a, gather_register(src, a, p));
    });
  });
  return out;
}

// threads (every function): at most this many threads per pass over the state; 0 (the default): torch's
// intra-op pool (torch.get_num_threads()). peft_qpa.fused_kernel.threads() chooses it per call.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("ry_layer_forward", &ry_layer_forward,
        "gather by perm (an index, or chain=True for the CNOT chain, or neither), then RY on every qubit",
        py::arg("state"), py::arg("perm"), py::arg("chain"), py::arg("c"), py::arg("s"), py::arg("out"),
        py::arg("threads") = 0);
  m.def("ry_layer_backward", &ry_layer_backward,
        "un-permute (inverse index, or inverse_chain=True) the layer's output and its gradient into y_out, "
        "lam_out, undo the layer there; returns dL/dtheta",
        py::arg("z"), py::arg("mu"), py::arg("inverse"), py::arg("inverse_chain"), py::arg("c"), py::arg("s"),
        py::arg("y_out"), py::arg("lam_out"), py::arg("threads") = 0);
  m.def("permute", &permute, "out[i] = state[perm(i)] (an index, or chain=True for the CNOT chain)",
        py::arg("state"), py::arg("perm"), py::arg("chain"), py::arg("out"), py::arg("threads") = 0);
}
