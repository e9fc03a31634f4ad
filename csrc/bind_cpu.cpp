// effops._C: the CPU kernels. One m.def per entry point; the logic lives in csrc/<family>/.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "nms/nms_api.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_C, m) {
  m.doc() = "effops CPU kernels (C++). Called by effops.ops; not a public API.";
  const auto release = nb::call_guard<nb::gil_scoped_release>();

  m.def("nms", &effops::nms::nms_api, "boxes"_a, "scores"_a, "iou_threshold"_a,
        "keep_out"_a.noconvert(), "threads"_a, release);
  m.def("batched_nms", &effops::nms::batched_nms_api, "boxes"_a, "scores"_a, "idxs"_a,
        "iou_threshold"_a, "keep_out"_a.noconvert(), "threads"_a, release);
  m.def("multiclass_nms", &effops::nms::multiclass_nms_api, "boxes"_a, "scores"_a,
        "iou_threshold"_a, "score_threshold"_a, "pre_nms_top_k"_a, "class_agnostic"_a,
        "num_out"_a.noconvert(), "boxes_out"_a.noconvert(), "scores_out"_a.noconvert(),
        "classes_out"_a.noconvert(), "indices_out"_a.noconvert(), "threads"_a, release);
  m.def("soft_nms", &effops::nms::soft_nms_api, "boxes"_a, "scores"_a, "iou_threshold"_a,
        "sigma"_a, "method"_a, "score_threshold"_a, "keep_out"_a.noconvert(),
        "scores_out"_a.noconvert(), "threads"_a, release);
  m.def("matrix_nms", &effops::nms::matrix_nms_api, "boxes"_a, "scores"_a, "idxs"_a.none(),
        "kernel"_a, "sigma"_a, "scores_out"_a.noconvert(), "threads"_a, release);

  m.def("build_info", []() {
    nb::dict d;
    d["version"] = EFFOPS_VERSION;
    d["compiler"] = EFFOPS_CXX_COMPILER;
#if defined(__x86_64__) && defined(__linux__)
    d["simd"] = "x86-64 baseline + AVX2 clones chosen at run time";
#else
    d["simd"] = "compiler default";
#endif
    return d;
  });
}
