// The Python module s3sparse._C. Importing it loads the shared library, whose
// static initialisers register every operator (csrc/ops.cpp and the kernels).
// It also exposes build_info(): what this binary was compiled with, and
// _packed_linear_call / _sp24_linear_call: the eager fast calls of s3sparse::packed_linear and
// s3sparse::sp24_linear.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <optional>

#ifndef S3SPARSE_TORCH_VERSION
#define S3SPARSE_TORCH_VERSION "unknown"
#endif
#ifndef S3SPARSE_CUDA_ARCH_LIST
#define S3SPARSE_CUDA_ARCH_LIST ""
#endif
#ifndef S3SPARSE_CUDA_VERSION
#define S3SPARSE_CUDA_VERSION ""
#endif

namespace {

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef S3SPARSE_WITH_CUDA
  const bool with_cuda = true;
  const char* arch = S3SPARSE_CUDA_ARCH_LIST;
  const char* cuda = S3SPARSE_CUDA_VERSION;
#else
  const bool with_cuda = false;
  const char* arch = "";
  const char* cuda = "";
#endif
  return Py_BuildValue("{s:O,s:O,s:s,s:s,s:s,s:s}",
                       "cpu", Py_True,
                       "cuda", with_cuda ? Py_True : Py_False,
                       "cuda_arch_list", arch,
                       "cuda_version", cuda,
                       "torch_version", S3SPARSE_TORCH_VERSION,
                       "cxx_standard", "c++20");
}

// ------------------------------------------------------------ packed_linear's eager call
// torch.ops calls a custom op through the boxed path: every argument becomes an
// IValue on a stack (13 here, two int lists) before the kernel's unboxing.
// That costs about 2 µs of host time a call, a tenth of a decode call's whole
// host time (issue 17: an eager PackedLinear call as cheap on the host as
// F.linear). This call converts the arguments directly and calls the op through
// the dispatcher's typed entry, so every dispatch key (autograd, Python
// dispatch modes, the profiler) sees the same op. It takes only what needs no
// Python-level semantics: plain tensors (or Parameters), Python ints, lists or
// tuples of them, bools, no __torch_function__ mode; anything else returns
// NotImplemented and the caller (s3sparse.ops.packed_linear) takes torch.ops.
// (A default device, torch.set_default_device or `with torch.device(...)`, is a
// __torch_function__ mode: such calls take torch.ops too.)
using PackedLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                   at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, int64_t,
                                   const std::optional<at::Tensor>&, bool);
constexpr Py_ssize_t kPackedLinearArgs = 13;
constexpr Py_ssize_t kMaxIntList = 16;  // longer lists take torch.ops (the kernel allows fewer dims anyway)

bool plain_int(PyObject* o, int64_t* out) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(o, &overflow);
  return overflow == 0 && !(*out == -1 && PyErr_Occurred());
}

bool plain_ints(PyObject* o, std::array<int64_t, kMaxIntList>* out, Py_ssize_t* n) {
  if (!PyList_CheckExact(o) && !PyTuple_CheckExact(o)) return false;
  *n = PySequence_Fast_GET_SIZE(o);
  if (*n > kMaxIntList) return false;
  PyObject** items = PySequence_Fast_ITEMS(o);
  for (Py_ssize_t i = 0; i < *n; ++i) {
    if (!plain_int(items[i], &(*out)[i])) return false;
  }
  return true;
}

// The GIL released for the op's run, restored on any exit (the op may throw).
struct ReleasedGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleasedGil() { PyEval_RestoreThread(state); }
};

PyObject* packed_linear_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != kPackedLinearArgs) {
    PyErr_SetString(PyExc_TypeError, "_packed_linear_call takes packed_linear's 13 arguments, positionally");
    return nullptr;
  }
  const auto not_implemented = [] { Py_RETURN_NOTIMPLEMENTED; };
  if (at::impl::torch_function_mode_enabled()) return not_implemented();
  for (int i : {0, 1, 2, 4, 5}) {
    if (!THPVariable_CheckExact(args[i])) return not_implemented();  // (a Parameter is exact too)
  }
  for (int i : {3, 11}) {
    if (args[i] != Py_None && !THPVariable_CheckExact(args[i])) return not_implemented();
  }
  std::array<int64_t, kMaxIntList> shape{}, stride{};
  Py_ssize_t n_shape = 0, n_stride = 0;
  int64_t meta_bits = 0, out_features = 0, row_group = 0;
  if (!plain_ints(args[6], &shape, &n_shape) || !plain_ints(args[7], &stride, &n_stride) ||
      !plain_int(args[8], &meta_bits) || !plain_int(args[9], &out_features) || !plain_int(args[10], &row_group) ||
      !PyBool_Check(args[12])) {
    PyErr_Clear();  // (an overflowing int: torch.ops raises its own error)
    return not_implemented();
  }
  // Owned copies, taken with the GIL held (another thread may swap a Python tensor's contents).
  const at::Tensor x = THPVariable_Unpack(args[0]), values = THPVariable_Unpack(args[1]),
                   meta = THPVariable_Unpack(args[2]), block_off = THPVariable_Unpack(args[4]),
                   elem_off = THPVariable_Unpack(args[5]);
  std::optional<at::Tensor> subsets, bias;
  if (args[3] != Py_None) subsets = THPVariable_Unpack(args[3]);
  if (args[11] != Py_None) bias = THPVariable_Unpack(args[11]);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("s3sparse::packed_linear", "").typed<PackedLinearSig>();
  at::Tensor y;
  {
    ReleasedGil released;
    y = op.call(x, values, meta, subsets, block_off, elem_off, at::IntArrayRef(shape.data(), n_shape),
                at::IntArrayRef(stride.data(), n_stride), meta_bits, out_features, row_group, bias,
                args[12] == Py_True);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// ------------------------------------------------------------ sp24_linear's eager call
// The same for s3sparse::sp24_linear (PackedLinear's 2:4 decode path): x, values, sp_meta plain tensors,
// out_features and column_order Python ints, bias None or a plain tensor, checked a bool; anything else NotImplemented
// (ops.sp24_linear).
using Sp24LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                 const std::optional<at::Tensor>&, bool, int64_t);

PyObject* sp24_linear_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "_sp24_linear_call takes sp24_linear's 7 arguments, positionally");
    return nullptr;
  }
  const auto not_implemented = [] { Py_RETURN_NOTIMPLEMENTED; };
  if (at::impl::torch_function_mode_enabled()) return not_implemented();
  for (int i : {0, 1, 2}) {
    if (!THPVariable_CheckExact(args[i])) return not_implemented();
  }
  if (args[4] != Py_None && !THPVariable_CheckExact(args[4])) return not_implemented();
  int64_t out_features = 0, column_order = 0;
  if (!plain_int(args[3], &out_features) || !PyBool_Check(args[5]) || !plain_int(args[6], &column_order)) {
    PyErr_Clear();
    return not_implemented();
  }
  const at::Tensor x = THPVariable_Unpack(args[0]), values = THPVariable_Unpack(args[1]),
                   sp_meta = THPVariable_Unpack(args[2]);
  std::optional<at::Tensor> bias;
  if (args[4] != Py_None) bias = THPVariable_Unpack(args[4]);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("s3sparse::sp24_linear", "").typed<Sp24LinearSig>();
  at::Tensor y;
  {
    ReleasedGil released;
    y = op.call(x, values, sp_meta, out_features, bias, args[5] == Py_True, column_order);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What the compiled extension contains."},
    {"_packed_linear_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(packed_linear_call)),
     METH_FASTCALL, "s3sparse::packed_linear through the dispatcher's typed call, or NotImplemented (ops.packed_linear)."},
    {"_sp24_linear_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sp24_linear_call)),
     METH_FASTCALL, "s3sparse::sp24_linear through the dispatcher's typed call, or NotImplemented (ops.sp24_linear)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "s3sparse compiled operators", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
