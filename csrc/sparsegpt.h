// sparsegpt_block_: one lazy block of SparseGPT's column sweep, for all row
// groups at once. Shared by the CPU kernel (csrc/cpu/sparsegpt.cpp) and the CUDA
// kernel (csrc/cuda/sparsegpt.cu): argument checks, the validation of the index
// tables (status bits), and the sweep of one row group itself, so both devices
// run literally the same arithmetic.
//
// The sweep is written in the operation order of the Python reference loop
// (s3sparse/pruners/sparsegpt.py, s3sparse/reference.py): every product and
// difference rounded on its own (no fused multiply-add: __fmul_rn / __fsub_rn on
// the GPU, -ffp-contract=off for the CPU file), so CPU, CUDA and the oracle agree
// bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace s3sparse {

// ------------------------------------------------------------------ status bits
// Returned in `status` (nothing is written when it is nonzero). s3sparse/ops.py
// turns them into messages.
constexpr int kSgptBadGroupRows = 1;     // a group_rows entry outside [0, M)
constexpr int kSgptBadScopePtr = 2;      // scope_ptr not 0 = p[0] <= p[1] <= ... <= p[b] = S
constexpr int kSgptBadScopeCols = 4;     // a scope_cols entry outside [0, b)
constexpr int kSgptColBeforeStart = 8;   // a scope listed at column i holds a column < i
constexpr int kSgptBadScopeRows = 16;    // a scope_rows entry outside [0, rows per group)

// ------------------------------------------------------------------ argument checks
// A 2-D tensor whose elements do not overlap (safe to write through any strides).
inline bool non_overlapping_2d(const at::Tensor& t) {
  const int64_t n0 = t.size(0), n1 = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  if (n0 <= 1 || n1 <= 1) return (n0 <= 1 || s0 >= 1) && (n1 <= 1 || s1 >= 1);
  return (s1 >= 1 && s0 >= n1 * s1) || (s0 >= 1 && s1 >= n0 * s0);
}

inline void check_sparsegpt_block(const at::Tensor& w, const at::Tensor& pruned, const at::Tensor& u,
                                  const at::Tensor& scope_ptr, const at::Tensor& scope_cols,
                                  const at::Tensor& scope_rows, const at::Tensor& group_rows, int64_t nnz,
                                  int64_t block_numel, const char* op) {
  check_dtype(w, at::kFloat, op, "w");
  check_dtype(pruned, at::kBool, op, "pruned");
  check_dtype(u, at::kFloat, op, "u");
  check_dtype(scope_ptr, at::kLong, op, "scope_ptr");
  check_dtype(scope_cols, at::kLong, op, "scope_cols");
  check_dtype(scope_rows, at::kLong, op, "scope_rows");
  check_dtype(group_rows, at::kLong, op, "group_rows");
  check_dim(w, 2, op, "w", "(M, b): the lazy block of the weight");
  check_dim(pruned, 2, op, "pruned", "(M, b): the pruning mask of the block");
  check_dim(u, 2, op, "u", "(b, b): the block of the upper Cholesky factor");
  check_dim(scope_ptr, 1, op, "scope_ptr", "(b + 1,): scopes starting at column i are scope_ptr[i]:scope_ptr[i+1]");
  check_dim(scope_cols, 2, op, "scope_cols", "(S, E): the column of every element of every scope");
  check_dim(scope_rows, 2, op, "scope_rows", "(S, E): the row within its group of every element");
  check_dim(group_rows, 2, op, "group_rows", "(R, G): the weight rows of every row group");
  check_same_device(w, pruned, op, "w", "pruned");
  check_same_device(w, u, op, "w", "u");
  check_same_device(w, scope_ptr, op, "w", "scope_ptr");
  check_same_device(w, scope_cols, op, "w", "scope_cols");
  check_same_device(w, scope_rows, op, "w", "scope_rows");
  check_same_device(w, group_rows, op, "w", "group_rows");
  const int64_t b = w.size(1);
  S3_CHECK_VALUE(pruned.sizes().equals(w.sizes()), op, ": `pruned` must have the shape of `w` ", w.sizes(),
                 ", got ", pruned.sizes());
  S3_CHECK_VALUE(u.size(0) == b && u.size(1) == b, op, ": `u` must be (b, b) = (", b, ", ", b,
                 ") for `w` of shape ", w.sizes(), ", got ", u.sizes());
  S3_CHECK_VALUE(scope_ptr.size(0) == b + 1, op, ": `scope_ptr` must be (b + 1,) = (", b + 1,
                 ",) for `w` of shape ", w.sizes(), ", got ", scope_ptr.sizes());
  S3_CHECK_VALUE(scope_rows.sizes().equals(scope_cols.sizes()), op, ": `scope_rows` must have the shape of `scope_cols` ",
                 scope_cols.sizes(), ", got ", scope_rows.sizes());
  S3_CHECK_VALUE(non_overlapping_2d(w), op, ": `w` must not have overlapping elements, got shape ", w.sizes(),
                 " and strides ", w.strides());
  S3_CHECK_VALUE(non_overlapping_2d(pruned), op, ": `pruned` must not have overlapping elements, got shape ",
                 pruned.sizes(), " and strides ", pruned.strides());
  S3_CHECK_VALUE(u.stride(0) >= 0 && u.stride(1) >= 0, op, ": `u` must have non-negative strides, got ", u.strides());
  const int64_t E = scope_cols.size(1);
  S3_CHECK_VALUE(block_numel >= 1, op, ": `block_numel` must be >= 1, got ", block_numel);
  S3_CHECK_VALUE(E % block_numel == 0, op, ": scopes of E=", E, " elements (`scope_cols` ", scope_cols.sizes(),
                 ") do not split into blocks of block_numel=", block_numel);
  const int64_t nb = E / block_numel;
  S3_CHECK_VALUE(nnz >= 0 && nnz <= nb, op, ": `nnz` must be in [0, ", nb, "] (blocks per scope), got ", nnz);
}

// ------------------------------------------------------------------ table validation
// Status bits of the table entries handled by one worker of `nworkers` (worker
// `k` takes every nworkers-th group-row entry and column); OR them over all
// workers. Host and device alike read the tables through plain pointers.
C10_HOST_DEVICE inline int sparsegpt_validate_part(const int64_t* ptr, const int64_t* cols, const int64_t* lrows,
                                                   const int64_t* group_rows, int64_t M, int64_t b, int64_t S,
                                                   int64_t E, int64_t R, int64_t rpg, int64_t k, int64_t nworkers) {
  int bad = 0;
  for (int64_t x = k; x < R * rpg; x += nworkers) {
    const int64_t r = group_rows[x];
    if (r < 0 || r >= M) bad |= kSgptBadGroupRows;
  }
  if (k == 0 && (ptr[0] != 0 || ptr[b] != S)) bad |= kSgptBadScopePtr;
  for (int64_t i = k; i < b; i += nworkers) {
    const int64_t p0 = ptr[i], p1 = ptr[i + 1];
    if (!(p0 >= 0 && p0 <= p1 && p1 <= S)) {
      bad |= kSgptBadScopePtr;
      continue;
    }
    for (int64_t x = p0 * E; x < p1 * E; ++x) {
      const int64_t c = cols[x], lr = lrows[x];
      if (c < 0 || c >= b) bad |= kSgptBadScopeCols;
      else if (c < i) bad |= kSgptColBeforeStart;
      if (lr < 0 || lr >= rpg) bad |= kSgptBadScopeRows;
    }
  }
  return bad;
}

// ------------------------------------------------------------------ the sweep
// IEEE single-precision operations, each rounded on its own.
C10_HOST_DEVICE inline float sgpt_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline float sgpt_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
C10_HOST_DEVICE inline float sgpt_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline float sgpt_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The scopes of one lazy block, shared by every row group (regular patterns):
// scopes ptr[i] .. ptr[i+1]-1 are decided when the sweep reaches column i;
// element e of scope s sits at column cols[s*E + e] (relative to the block) and
// row lrows[s*E + e] of the group; block k of a scope is elements
// [k*bn, (k+1)*bn).
struct SgptTables {
  const int64_t* ptr;
  const int64_t* cols;
  const int64_t* lrows;
  int64_t E;
  int64_t bn;
  int64_t nnz;
};

// Sweep one row group of `rpg` rows over the b columns of the block, through
// accessors: w(r, j) -> float& (the group's weights, updated in place; column j
// ends as its pruned value q_j), pruned(r, j) -> uint8_t& (mask in / out),
// err(r, j) -> float& (the propagated error, every column written), u(i, j) ->
// float (the factor block), key(k) -> float& (scratch, one per block of a
// scope); d2[c] = u(c, c)^2.
//
// At column i, first every scope listed there: block k scores
// sum_e w(e)^2 / d2[col e] (summed in element order), NaN ranking as -inf; the
// nnz blocks of largest score are kept (ties to the lower block index, as
// kth_largest), the others marked pruned. Then for every row r:
//   q = pruned ? 0 : w_i;  err_i = (w_i - q) / u_ii;  w_j -= err_i * u_ij (j > i);  w_i = q.
//
// I: the index type of the loops (int on the GPU, where a group's block lives in
// shared memory; int64_t on the CPU).
template <typename I, class WAt, class PAt, class EAt, class UAt, class KAt>
C10_HOST_DEVICE inline void sparsegpt_sweep(WAt&& w, PAt&& pruned, EAt&& err, UAt&& u, const float* d2, KAt&& key,
                                            const SgptTables& t, I b, I rpg) {
  const I E = static_cast<I>(t.E), bn = static_cast<I>(t.bn), nnz = static_cast<I>(t.nnz);
  const I nb = E / bn;
  for (I i = 0; i < b; ++i) {
    const I s_end = static_cast<I>(t.ptr[i + 1]);
    for (I s = static_cast<I>(t.ptr[i]); s < s_end; ++s) {
      const int64_t* sc = t.cols + static_cast<int64_t>(s) * E;
      const int64_t* sr = t.lrows + static_cast<int64_t>(s) * E;
      for (I k = 0; k < nb; ++k) {
        float acc = 0.0f;
        for (I e = k * bn; e < (k + 1) * bn; ++e) {
          const I c = static_cast<I>(sc[e]);
          const float v = w(static_cast<I>(sr[e]), c);
          acc = sgpt_add(acc, sgpt_div(sgpt_mul(v, v), d2[c]));
        }
        key(k) = acc != acc ? -INFINITY : acc;
      }
      for (I k = 0; k < nb; ++k) {
        const float mine = key(k);
        I rank = 0;  // blocks ranked before k: larger, or equal with a lower index
        for (I k2 = 0; k2 < nb; ++k2) {
          const float other = key(k2);
          rank += (other > mine || (other == mine && k2 < k)) ? 1 : 0;
        }
        const uint8_t prune = rank >= nnz ? 1 : 0;
        for (I e = k * bn; e < (k + 1) * bn; ++e) pruned(static_cast<I>(sr[e]), static_cast<I>(sc[e])) = prune;
      }
    }
    const float uii = u(i, i);
    for (I r = 0; r < rpg; ++r) {
      const float wi = w(r, i);
      const float q = pruned(r, i) ? 0.0f : wi;
      const float e = sgpt_div(sgpt_sub(wi, q), uii);
      err(r, i) = e;
      // w_j -= e * u_ij, eight columns at a time with every load ahead of the
      // stores (the compiler cannot tell that w and u never alias: on the GPU
      // this keeps 16 shared-memory loads in flight instead of one).
      I j = i + 1;
      for (; j + 8 <= b; j += 8) {
        float uj[8], wj[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) uj[x] = u(i, j + x);
#pragma unroll
        for (int x = 0; x < 8; ++x) wj[x] = w(r, j + x);
#pragma unroll
        for (int x = 0; x < 8; ++x) w(r, j + x) = sgpt_sub(wj[x], sgpt_mul(e, uj[x]));
      }
      for (; j < b; ++j) w(r, j) = sgpt_sub(w(r, j), sgpt_mul(e, u(i, j)));
      w(r, i) = q;
    }
  }
}

}  // namespace s3sparse
