// Every s3sparse operator schema, in one place. Kernels live in csrc/cpu and
// csrc/cuda (TORCH_LIBRARY_IMPL); Python wrappers, fake kernels and docs in
// s3sparse/ops.py; pure-torch oracles in s3sparse/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(s3sparse, m) {
  // Strided block reductions: view (size, stride, offset) over the flat elements
  // of contiguous `x`, cut into blocks; one value per block ('norm' with `p`,
  // 'min', 'max' or 'sum'). The view is never materialised.
  m.def("block_reduce(Tensor x, int[] size, int[] stride, int offset, int[] block, str reduce, float p=2.0) -> Tensor");

  // In-place block scaling over the same kind of view: every element of block g
  // is multiplied by scale[g]; a zero factor writes an exact zero (masking).
  m.def("block_scale_(Tensor(a!) x, int[] size, int[] stride, int offset, int[] block, Tensor scale) -> ()");

  // Along the last dim: the k-th largest value and a mask of exactly the k
  // largest entries (ties go to the lower index; NaN ranks as -inf).
  m.def("kth_largest(Tensor x, int k) -> (Tensor values, Tensor keep)");

  // Batched OBS subset scoring. For item n with weights w[n] (E,) and inverse-
  // Hessian block C = c[c_index[n]] (E, E): cost[n, s] = w_P^T (C_PP)^-1 w_P for
  // P = subsets[s]; best[n] = argmin_s cost[n, s]. Non-PD C_PP costs +inf.
  m.def("score_subsets(Tensor w, Tensor c, Tensor? c_index, Tensor subsets) -> (Tensor costs, Tensor best)");

  // The Schur-update op family of True OBS (left-looking, factored): a batched
  // low-rank correction out[n] = base[n] - a[n] @ b[n]^T, fp32 accumulation (fp64
  // for fp64 inputs), a and b possibly fp16/bf16 storage; b may be a strided view
  // (last dim contiguous), read in place. No per-row C is ever stored: after a row
  // pruned the columns Q, its C is the Schur complement C0 - C0[:,Q] C0[Q,Q]^-1
  // C0[Q,:] = C0 - U U^T, with U_j = C[:, S_j] L_j^-T appended per batch S_j
  // (L_j = chol(C[S_j, S_j])). The panel C[S, R] = C0[S, R] - U[S, :] U[R, :]^T,
  // the scope blocks scoring reads, and U_j itself are all this op
  // (s3sparse/pruners/true_obs_sweep.py).
  m.def("lowrank_sub(Tensor base, Tensor a, Tensor b) -> Tensor");

  // A batch's new factor U_j = C[R, S_j] L_j^-T = panel^T linv^T: panel (N, P, R)
  // (the batch's rows of C), linv (N, P, P) (L_j^-1), both fp32 (or both fp64);
  // out (N, R, P) in their dtype, at fp32 accuracy (bf16 parts: 16 bits). With
  // split_dtype fp16/bf16 a kernel may form it on tensor cores from hi + lo parts
  // of both operands in split_dtype (3 products; lo x lo dropped): CUDA does, reading the panel once;
  // the CPU multiplies in fp32 (its BLAS has no fp16 GEMM).
  m.def("lowrank_factor(Tensor panel, Tensor linv, ScalarType split_dtype) -> Tensor");

  // One lazy block of SparseGPT's column sweep, every row group at once (see
  // csrc/sparsegpt.h). w (M, b) fp32: the block's weights (any strides), left
  // as the pruned values; pruned (M, b) bool: the mask, read and completed; u
  // (b, b) fp32: the block of the upper Cholesky factor of (H + lambda I)^-1.
  // Row group g is the rows group_rows[g] (R, G); scopes scope_ptr[i] ..
  // scope_ptr[i+1]-1 (scope_ptr (b+1,)) are decided when the sweep reaches column
  // i, in every group: element e of scope s at column scope_cols[s, e] and group
  // row scope_rows[s, e] (both (S, E)); blocks of block_numel elements; the nnz
  // of largest sum w^2 / u_cc^2 kept (ties to the lower block, NaN as -inf).
  // Then per row: q = pruned ? 0 : w_i, err_i = (w_i - q) / u_ii,
  // w_j -= err_i u_ij for j > i, w_i = q. Returns err (M, b) (zero on rows in no
  // group) and status () int32: bits of invalid table entries (then nothing is
  // written and err is zero), checked on the device without a host sync.
  m.def("sparsegpt_block_(Tensor(a!) w, Tensor(b!) pruned, Tensor u, Tensor scope_ptr, Tensor scope_cols, "
        "Tensor scope_rows, Tensor group_rows, int nnz, int block_numel) -> (Tensor err, Tensor status)");

  // Packed structured-sparse weights (s3sparse.sparse.PackedWeight): W (M, K)
  // row-major is covered exactly once by S scopes that each keep nnz blocks of B
  // elements. values (S, nnz, B): kept blocks (scope grid row-major; kept blocks
  // by increasing in-scope index; block elements row-major). meta (W,) int32:
  // unsigned fields of meta_bits bits, 32 / meta_bits per word, field i in word
  // i / per_word at bit (i % per_word) * meta_bits; with subsets (n_codes, nnz)
  // int32 one field per scope, the code of its kept set (kept blocks
  // subsets[code]); without, nnz fields per scope (field s*nnz+j = in-scope index
  // of kept block j). Element e of in-scope block g of scope s is W's flat
  // element f = sum_d idx_d(s) * scope_stride[d] + block_off[g] + elem_off[e]
  // (row f / K, col f % K), idx(s) = s unravelled row-major over scope_shape.
  m.def("packed_to_dense(Tensor values, Tensor meta, Tensor? subsets, Tensor block_off, Tensor elem_off, "
        "int[] scope_shape, int[] scope_stride, int meta_bits, int out_features, int in_features) -> Tensor");

  // y = x @ W^T + bias for the packed W above; x (..., K) of the dtype of values,
  // fp32 accumulation (fp64 for fp64), y (..., M). row_group R > 0 promises that
  // the scopes come in M / R groups of S R / M consecutive scopes, group q
  // touching only rows [q R, (q + 1) R) of W (kernels may then accumulate a
  // group's rows on chip); R = 0 promises nothing. checked = true: the caller
  // has had these tables (meta, subsets, block_off, elem_off, geometry) accepted
  // by an earlier call on this device, so a GPU kernel may skip the host sync
  // that turns bad data into an error (it still never reads out of bounds, and
  // writes NaN where the data is bad); the CPU kernel checks either way.
  m.def("packed_linear(Tensor x, Tensor values, Tensor meta, Tensor? subsets, Tensor block_off, Tensor elem_off, "
        "int[] scope_shape, int[] scope_stride, int meta_bits, int out_features, int row_group, Tensor? bias, "
        "bool checked=False) -> Tensor");

  // y = x @ W^T + bias for a 2:4 W as the sparse tensor cores read it (mma.sp
  // m16n8k32): values, W's kept values (two a group of 4 columns, each row's in
  // column order: M * K / 2 elements, contiguous), and sp_meta (M/16, K/64, 32)
  // int32, the kept columns in the instruction's order (csrc/sp24.h; built by
  // s3sparse.sparse.sp24.sp24_meta_words). x (..., K) float16 / bfloat16 of the
  // dtype of values, M % 16 == 0, K % 64 == 0; fp32 accumulation, one rounding
  // (after the bias). The CPU kernel checks sp_meta (ValueError); the CUDA
  // kernel checks it without a host sync, a bad word making its 16-row tile's
  // outputs NaN, unless checked = true: the caller vouches for sp_meta (built
  // by sp24_meta_words and unchanged since), and the kernel skips the check
  // (faster: more loads in flight). It never reads out of bounds either way.
  // column_order 1 (4:8) / 2 (coupled 2:4): the groups of 4 are fixed column
  // permutations of W and the values stored a kept pair at a time (csrc/sp24.h).
  m.def("sp24_linear(Tensor x, Tensor values, Tensor sp_meta, int out_features, Tensor? bias, "
        "bool checked=False, int column_order=0) -> Tensor");
}
