// CPU kernels of packed_to_dense and packed_linear (format: csrc/packed.h).
//
// packed_to_dense scatters every kept block into a zero W, scopes in parallel.
// packed_linear, for up to 8 tokens of a weight whose scopes each lie in one row
// (row_group 1, subset codes: n:m, coupled n:m), multiplies every kept element
// into its row's sums as it decodes it (direct_rows); otherwise it decodes W
// tile by tile into the accumulation precision (fp32, fp64 for fp64) and
// multiplies each tile by BLAS: with a row_group promise a
// tile is a few whole row groups (about 2 MiB, so it stays in cache and W is
// never materialised), without one the tile is all of W. Both validate the data
// while decoding (block indices, codes, offsets, the row-group promise) and
// raise before returning anything.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "packed.h"

namespace s3sparse {
namespace {

// The data pointers of the tables, and the extent of a block's elements.
struct PackedTables {
  const int32_t* meta = nullptr;
  const int32_t* subsets = nullptr;  // null: per-block indices
  const int64_t* block_off = nullptr;
  const int64_t* elem_off = nullptr;
  int64_t elem_lo = 0, elem_hi = 0;  // min / max of elem_off (0 when B == 0)
};

PackedTables host_tables(const PackedGeometry& g, const at::Tensor& meta, const std::optional<at::Tensor>& subsets,
                         const at::Tensor& block_off, const at::Tensor& elem_off, const char* op) {
  PackedTables t;
  t.meta = meta.const_data_ptr<int32_t>();
  if (subsets.has_value()) {
    check_packed_subsets_host(g, *subsets, op);
    t.subsets = subsets->const_data_ptr<int32_t>();
  }
  t.block_off = block_off.const_data_ptr<int64_t>();
  t.elem_off = elem_off.const_data_ptr<int64_t>();
  if (g.B > 0) {
    t.elem_lo = *std::min_element(t.elem_off, t.elem_off + g.B);
    t.elem_hi = *std::max_element(t.elem_off, t.elem_off + g.B);
  }
  return t;
}

// Reads consecutive meta fields from field `i` on, without a division per field.
struct FieldCursor {
  const int32_t* meta;
  int bits, per_word, slot;
  int64_t word;
  uint32_t mask;

  FieldCursor(const int32_t* m, int64_t i, int b, int pw)
      : meta(m), bits(b), per_word(pw), slot(static_cast<int>(i % pw)), word(i / pw),
        mask(b >= 32 ? 0xFFFFFFFFu : ((1u << b) - 1u)) {}
  inline uint32_t take() {
    const uint32_t v = (static_cast<uint32_t>(meta[word]) >> (slot * bits)) & mask;
    if (++slot == per_word) {
      slot = 0;
      ++word;
    }
    return v;
  }
};

// Walks the scope grid row-major from scope s, keeping the flat base of the
// current scope (an odometer: no division per scope).
struct ScopeCursor {
  const PackedGeometry& g;
  int64_t idx[kMaxPackedScopeDims] = {};
  int64_t base = 0;

  ScopeCursor(const PackedGeometry& geo, int64_t s) : g(geo) {
    for (int d = g.ndim - 1; d >= 0; --d) {
      idx[d] = s % g.scope_shape[d];
      s /= g.scope_shape[d];
      base += idx[d] * g.scope_stride[d];
    }
  }
  inline void next() {
    for (int d = g.ndim - 1; d >= 0; --d) {
      base += g.scope_stride[d];
      if (++idx[d] < g.scope_shape[d]) return;
      base -= g.scope_shape[d] * g.scope_stride[d];
      idx[d] = 0;
    }
  }
};

// Every code's kept elements as offsets from the scope's origin (n_codes x nnz B), and each code's smallest
// and largest offset: one lookup a scope instead of a block index and an offset a kept block. Built
// (`ready`) only where it pays and means the same: subset codes, no more codes than scopes (so the table
// is no larger than the values), and no code placing two of its elements at one offset (there the kernels
// that store would keep the last and the direct sums would add both: such tables take the per-block path).
struct CodeOffsets {
  std::vector<int64_t> off, lo, hi;
  int64_t all_lo = 0, all_hi = 0;  // the smallest lo and the largest hi over every code
  int64_t per_code = 0;
  bool ready = false;

  // 0 when `code`'s elements from a scope at flat `base` all lie in W's flat [lo, hi); else the error
  // bit: `out_of_range` (inside W, outside the promised rows) or kPackedBadOffset (outside W).
  inline int span_error(uint32_t code, int64_t base, int64_t lo, int64_t hi, int64_t w_end,
                        int out_of_range) const {
    const int64_t first = base + this->lo[code], last = base + this->hi[code];
    if (first >= lo && last < hi) return 0;
    return (first >= 0 && last < w_end) ? out_of_range : kPackedBadOffset;
  }
};

CodeOffsets code_offsets(const PackedGeometry& g, const PackedTables& t) {
  CodeOffsets c;
  if (t.subsets == nullptr || g.n_codes > g.S) return c;
  c.per_code = g.nnz * g.B;
  c.off.resize(static_cast<size_t>(g.n_codes * c.per_code));
  c.lo.assign(static_cast<size_t>(g.n_codes), 0);
  c.hi.assign(static_cast<size_t>(g.n_codes), 0);
  std::vector<int64_t> sorted(static_cast<size_t>(c.per_code));
  for (int64_t code = 0; code < g.n_codes; ++code) {
    int64_t* o = c.off.data() + code * c.per_code;
    for (int64_t j = 0; j < g.nnz; ++j)  // (subsets entries < G: check_packed_subsets_host)
      for (int64_t e = 0; e < g.B; ++e) o[j * g.B + e] = t.block_off[t.subsets[code * g.nnz + j]] + t.elem_off[e];
    if (c.per_code == 0) continue;
    std::copy(o, o + c.per_code, sorted.begin());
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) return CodeOffsets{};
    c.lo[code] = sorted.front();
    c.hi[code] = sorted.back();
  }
  if (c.per_code > 0 && g.n_codes > 0) {
    c.all_lo = *std::min_element(c.lo.begin(), c.lo.end());
    c.all_hi = *std::max_element(c.hi.begin(), c.hi.end());
  }
  c.ready = true;
  return c;
}

// Scatter scopes [s0, s1) into `dst`, which holds W's flat elements [lo, hi)
// (dst[f - lo]). Returns the PackedDataError bits of what was skipped. With subset codes
// and their offset table (`c` ready) one lookup and one bounds check a scope; else a
// block index and a check a kept block.
template <typename src_t, typename dst_t>
int scatter_scopes(const PackedGeometry& g, const PackedTables& t, const CodeOffsets& c, const src_t* values,
                   dst_t* dst, int64_t lo, int64_t hi, int64_t s0, int64_t s1, int out_of_range_error) {
  int status = 0;
  const bool codes = t.subsets != nullptr;
  FieldCursor field(t.meta, codes ? s0 : s0 * g.nnz, g.meta_bits, g.per_word);
  ScopeCursor scope(g, s0);
  const int64_t w_end = g.M * g.K;
  for (int64_t s = s0; s < s1; ++s, scope.next()) {
    const src_t* src = values + s * g.nnz * g.B;
    const int32_t* kept_row = nullptr;
    if (codes) {
      const uint32_t code = field.take();
      if (code >= static_cast<uint64_t>(g.n_codes)) {
        status |= kPackedBadCode;
        continue;
      }
      if (c.ready) {
        if (c.per_code == 0) continue;
        // Outside W, or (for a tile) outside the rows this scope's group owns.
        if (const int bad = c.span_error(code, scope.base, lo, hi, w_end, out_of_range_error)) {
          status |= bad;
          continue;
        }
        const int64_t* o = c.off.data() + code * c.per_code;
        dst_t* out = dst + (scope.base - lo);
        for (int64_t i = 0; i < c.per_code; ++i) out[o[i]] = static_cast<dst_t>(src[i]);
        continue;
      }
      kept_row = t.subsets + static_cast<int64_t>(code) * g.nnz;
    }
    for (int64_t j = 0; j < g.nnz; ++j, src += g.B) {
      const int64_t k = codes ? static_cast<int64_t>(kept_row[j]) : static_cast<int64_t>(field.take());
      if (k >= g.G) {
        status |= kPackedBadIndex;
        continue;
      }
      const int64_t origin = scope.base + t.block_off[k];
      if (g.B > 0 && (origin + t.elem_lo < lo || origin + t.elem_hi >= hi)) {
        const bool in_w = origin + t.elem_lo >= 0 && origin + t.elem_hi < w_end;
        status |= in_w ? out_of_range_error : kPackedBadOffset;
        continue;
      }
      dst_t* out = dst + (origin - lo);
      for (int64_t e = 0; e < g.B; ++e) out[t.elem_off[e]] = static_cast<dst_t>(src[e]);
    }
  }
  return status;
}

// Scatter scopes [s0, s1) in parallel; raise on bad data.
template <typename src_t, typename dst_t>
void scatter_scopes_parallel(const PackedGeometry& g, const PackedTables& t, const CodeOffsets& c,
                             const src_t* values, dst_t* dst, int64_t lo, int64_t hi, int64_t s0, int64_t s1,
                             int out_of_range_error, const char* op) {
  std::atomic<int> status{0};
  const int64_t per_scope = std::max<int64_t>(1, g.nnz * g.B);
  const int64_t grain = std::max<int64_t>(1, 16384 / per_scope);
  at::parallel_for(s0, s1, grain, [&](int64_t a, int64_t b) {
    const int bad = scatter_scopes(g, t, c, values, dst, lo, hi, a, b, out_of_range_error);
    if (bad) status.fetch_or(bad);
  });
  const int bad = status.load();
  S3_CHECK_VALUE(bad == 0, packed_data_error_message(bad, g, op));
}

at::Tensor packed_to_dense_cpu(const at::Tensor& values, const at::Tensor& meta, const std::optional<at::Tensor>& subsets,
                               const at::Tensor& block_off, const at::Tensor& elem_off, at::IntArrayRef scope_shape,
                               at::IntArrayRef scope_stride, int64_t meta_bits, int64_t out_features,
                               int64_t in_features) {
  constexpr const char* op = "s3sparse.packed_to_dense";
  const PackedGeometry g = check_packed_to_dense(values, meta, subsets, block_off, elem_off, scope_shape, scope_stride,
                                                 meta_bits, out_features, in_features, op);
  at::Tensor out = at::zeros({g.M, g.K}, values.options());
  const PackedTables t = host_tables(g, meta, subsets, block_off, elem_off, op);
  if (g.S == 0 || g.nnz == 0) return out;
  const CodeOffsets c = code_offsets(g, t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_to_dense_cpu", [&] {
    scatter_scopes_parallel(g, t, c, values.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), 0,
                            g.M * g.K, 0, g.S, kPackedBadOffset, op);
  });
  return out;
}

// Decode batches (at most kDirectMaxTokens tokens) of row_group-1 weights (every scope in one row: n:m,
// coupled n:m) skip the tile: each kept element is multiplied into its row's sums as it is decoded, rows
// in parallel. The tile path zeroes a tile, scatters W into it and calls BLAS, which pays the zeroing and
// a second pass over the tile for one token (2:4, 2560x9728, fp32, one thread: 78 ms against dense 6.3).
constexpr int kDirectMaxTokens = 8;

// How a row's scopes lie, where they are regular: `outer` runs of `inner` scopes, a scope `istep` after the
// previous in its run, a run `ostep` after the previous run. That holds where the row's scopes are consecutive
// along the scope grid's last dimension (n:m: one run), or are whole runs of it, consecutive along the
// dimension before (coupled n:m: runs of 2). Then whether every code of every scope of the row stays inside
// the row is one check a row (the extreme origins and the extreme offsets of any code), and the loop walks x.
struct RowSteps {
  int64_t inner = 0, outer = 0, istep = 0, ostep = 0;

  RowSteps(const PackedGeometry& g, const ScopeCursor& first, int64_t per_row) {
    if (g.ndim < 1) return;
    const int d = g.ndim - 1;
    if (first.idx[d] + per_row <= g.scope_shape[d]) {
      inner = per_row, outer = 1, istep = g.scope_stride[d];
    } else if (g.ndim >= 2 && first.idx[d] == 0 && per_row % g.scope_shape[d] == 0 &&
               first.idx[d - 1] + per_row / g.scope_shape[d] <= g.scope_shape[d - 1]) {
      inner = g.scope_shape[d], outer = per_row / inner, istep = g.scope_stride[d], ostep = g.scope_stride[d - 1];
    }
  }
  // Whether every scope (origins from `base`) with any code stays in W's flat [lo, hi). In 128 bits: strides
  // and offsets near 2^63 (nothing bounds them) must not wrap into a false yes.
  bool inside(int64_t base, const CodeOffsets& c, int64_t lo, int64_t hi) const {
    if (inner == 0) return false;
    using wide = __int128;
    const wide di = wide(inner - 1) * istep, dout = wide(outer - 1) * ostep;
    const wide first = wide(base) + std::min<wide>(0, di) + std::min<wide>(0, dout) + c.all_lo;
    const wide last = wide(base) + std::max<wide>(0, di) + std::max<wide>(0, dout) + c.all_hi;
    return first >= lo && last < hi;
  }
};

// y[t, r] (y is (N, M)) for rows [r0, r1) of a row_group-1 weight with subset codes (their offset table
// ready, something kept); x is (N, K); N a compile-time count, so the sums stay in registers. Returns the
// PackedDataError bits of what was skipped (a bad code; a scope reaching outside its row: outside W or
// outside the row it promised). A row whose scopes are regular and inside it (RowSteps) takes one check;
// any other, one a scope.
template <int N, int FixedL, typename src_t, typename acc_t>
int direct_rows(const PackedGeometry& g, const PackedTables& t, const CodeOffsets& c, const src_t* values,
                const acc_t* x, acc_t* y, int64_t r0, int64_t r1) {
  // (from 4 tokens the tokens' sums are independent chains enough; more parts there spill: 8 tokens 10-30 % slower)
  constexpr int kChains = FixedL > 0 && N <= 2 ? FixedL : 1;
  int status = 0;
  const int64_t per_row = g.S / g.M;  // scopes a row (exact: checked with row_group)
  // Elements a scope: a constant for the common 2 (2:4) and 4 (4:8, coupled 2:4), so the loop unrolls.
  const int64_t w_end = g.M * g.K, L = FixedL > 0 ? FixedL : c.per_code;
  const int64_t* off = c.off.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s0 = r * per_row, lo = r * g.K;
    FieldCursor field(t.meta, s0, g.meta_bits, g.per_word);
    ScopeCursor scope(g, s0);
    // A token's sum in kChains independent parts (a scope's element i into part i), added at the row's end:
    // one sum waited on each add in turn (2:4 at one token: 2 dependent adds a scope bound the loop).
    acc_t acc[kChains][N] = {};
    const src_t* v = values + s0 * L;
    // The products of the scope at `v` (its code checked), its origin at `xs` in x, into the sums.
    const auto add = [&](const acc_t* xs, uint32_t code) {
      const int64_t* o = off + code * L;
      for (int64_t i = 0; i < L; ++i) {
        const acc_t w = static_cast<acc_t>(v[i]);
        acc_t* part = acc[kChains > 1 ? i : 0];
        for (int n = 0; n < N; ++n) part[n] += w * xs[n * g.K + o[i]];
      }
    };
    const RowSteps steps(g, scope, per_row);
    if (steps.inside(scope.base, c, lo, lo + g.K)) {
      const acc_t* run = x + (scope.base - lo);
      for (int64_t j = 0; j < steps.outer; ++j, run += steps.ostep) {
        const acc_t* xs = run;
        for (int64_t k = 0; k < steps.inner; ++k, xs += steps.istep, v += L) {
          const uint32_t code = field.take();
          if (code < static_cast<uint64_t>(g.n_codes)) {
            add(xs, code);
          } else {
            status |= kPackedBadCode;
          }
        }
      }
    } else {
      for (int64_t s = s0; s < s0 + per_row; ++s, scope.next(), v += L) {
        const uint32_t code = field.take();
        if (code >= static_cast<uint64_t>(g.n_codes)) {
          status |= kPackedBadCode;
        } else if (const int bad = c.span_error(code, scope.base, lo, lo + g.K, w_end, kPackedBadGroup)) {
          status |= bad;
        } else {
          add(x + (scope.base - lo), code);
        }
      }
    }
    for (int n = 0; n < N; ++n) {
      acc_t sum = acc[0][n];
      for (int i = 1; i < kChains; ++i) sum += acc[i][n];
      y[n * g.M + r] = sum;
    }
  }
  return status;
}

template <typename src_t, typename acc_t, int N = 1>
int direct_rows_n(int64_t n, const PackedGeometry& g, const PackedTables& t, const CodeOffsets& c,
                  const src_t* values, const acc_t* x, acc_t* y, int64_t r0, int64_t r1) {
  if constexpr (N < kDirectMaxTokens) {
    if (n != N) return direct_rows_n<src_t, acc_t, N + 1>(n, g, t, c, values, x, y, r0, r1);
  }
  if (c.per_code == 2) return direct_rows<N, 2>(g, t, c, values, x, y, r0, r1);
  if (c.per_code == 4) return direct_rows<N, 4>(g, t, c, values, x, y, r0, r1);
  return direct_rows<N, 0>(g, t, c, values, x, y, r0, r1);
}

// Rows per tile: whole row groups, about 2 MiB of fp32 (at least one group).
int64_t tile_rows(const PackedGeometry& g) {
  if (g.row_group == 0) return g.M;
  const int64_t target = std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(1, g.K));
  return std::min(g.M, g.row_group * std::max<int64_t>(1, target / g.row_group));
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                             const at::Tensor& elem_off, at::IntArrayRef scope_shape, at::IntArrayRef scope_stride,
                             int64_t meta_bits, int64_t out_features, int64_t row_group,
                             const std::optional<at::Tensor>& bias, bool /*checked: the CPU kernel always checks*/) {
  constexpr const char* op = "s3sparse.packed_linear";
  const PackedGeometry g = check_packed_linear(x, values, meta, subsets, block_off, elem_off, scope_shape,
                                               scope_stride, meta_bits, out_features, row_group, bias, op);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(g.M);
  const int64_t N = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const PackedTables t = host_tables(g, meta, subsets, block_off, elem_off, op);
  if (N == 0 || g.M == 0) return at::zeros(out_sizes, x.options());

  const auto acc = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x2 = x.reshape({N, g.K}).to(acc).contiguous();
  const CodeOffsets c = code_offsets(g, t);
  if (g.row_group == 1 && N <= kDirectMaxTokens && c.ready && c.per_code > 0) {  // (ready: codes and S >= 1)
    at::Tensor y = at::empty({N, g.M}, x2.options());
    std::atomic<int> status{0};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_linear_cpu_direct", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.K));
      at::parallel_for(0, g.M, grain, [&](int64_t r0, int64_t r1) {
        const int bad = direct_rows_n<scalar_t, acc_t>(N, g, t, c, values.const_data_ptr<scalar_t>(),
                                                       x2.const_data_ptr<acc_t>(), y.mutable_data_ptr<acc_t>(), r0, r1);
        if (bad) status.fetch_or(bad);
      });
    });
    const int bad = status.load();
    S3_CHECK_VALUE(bad == 0, packed_data_error_message(bad, g, op));
    if (bias.has_value()) y = y + bias->to(acc);
    return y.to(x.scalar_type()).view(out_sizes);
  }
  const at::Tensor xt = x2.t();
  at::Tensor yt = at::empty({g.M, N}, x2.options());  // y transposed: a tile's rows are a contiguous slice
  const int64_t rows = tile_rows(g);
  at::Tensor tile = at::empty({rows, g.K}, x2.options());
  // Scopes per row group: exact (checked with row_group); a tile is whole groups.
  const int64_t scopes_per_group = g.row_group > 0 ? g.S * g.row_group / g.M : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < g.M; r0 += rows) {
      const int64_t r1 = std::min(g.M, r0 + rows);
      at::Tensor part = tile.narrow(0, 0, r1 - r0);
      part.zero_();
      const int64_t s0 = g.row_group > 0 ? r0 / g.row_group * scopes_per_group : 0;
      const int64_t s1 = g.row_group > 0 ? r1 / g.row_group * scopes_per_group : g.S;
      if (g.nnz > 0 && s1 > s0) {
        scatter_scopes_parallel(g, t, c, v, part.mutable_data_ptr<acc_t>(), r0 * g.K, r1 * g.K, s0, s1,
                                kPackedBadGroup, op);
      }
      at::Tensor out_rows = yt.narrow(0, r0, r1 - r0);
      at::mm_out(out_rows, part, xt);
    }
  });
  at::Tensor y = yt.t();
  if (bias.has_value()) y = y + bias->to(acc);
  return y.to(x.scalar_type()).contiguous().view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CPU, m) {
  m.impl("packed_to_dense", &packed_to_dense_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
}

}  // namespace s3sparse
