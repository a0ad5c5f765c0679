// The Python module s3sparse._C. Importing it loads the shared library, whose
// static initialisers register every operator (csrc/ops.cpp and the kernels).
// It also exposes build_info(): what this binary was compiled with.
#include <Python.h>

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

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What the compiled extension contains."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "s3sparse compiled operators", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
