// effops._C: the CPU kernels. One m.def per entry point; the logic lives in csrc/<family>/.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bifpn/fuse_api.h"
#include "common/parallel.h"
#include "common/isa.h"
#include "dwsep/block_api.h"
#include "dwsep/dwsep_api.h"
#include "losses/losses_api.h"
#include "nms/nms_api.h"
#include "norm/bn_act_api.h"
#include "qconv/qblock_api.h"
#include "qconv/qconv_api.h"

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
  m.def("topk_candidates", &effops::nms::topk_candidates_api, "levels"_a, "k"_a, "top_anchor"_a.noconvert(),
        "pos"_a.noconvert(), "vals"_a.noconvert(), "threads"_a, release);
  m.def("matrix_nms", &effops::nms::matrix_nms_api, "boxes"_a, "scores"_a, "idxs"_a.none(),
        "kernel"_a, "sigma"_a, "scores_out"_a.noconvert(), "threads"_a, release);

  m.def("dw_forward", &effops::dwsep::dw_forward_api, "x"_a, "taps"_a, "scale"_a.none(),
        "bias"_a.none(), "stride"_a, "pad"_a, "dilation"_a, "act"_a, "in_act"_a,
        "y"_a.noconvert(), "sums"_a.noconvert().none(), "threads"_a, release);
  m.def("dw_backward", &effops::dwsep::dw_backward_api, "a"_a, "taps"_a, "gd"_a, "stride"_a,
        "pad"_a, "dilation"_a, "ga"_a.noconvert(), "gw"_a.noconvert(), "threads"_a, release);
  m.def("pw_forward", &effops::dwsep::pw_forward_api, "y"_a, "w"_a, "channel_scale"_a.none(),
        "scale"_a.none(), "bias"_a.none(), "act"_a, "residual"_a.none(), "out"_a.noconvert(),
        "threads"_a, release);
  m.def("dwsep_forward", &effops::dwsep::dwsep_forward_api, "x"_a, "taps"_a, "pw"_a,
        "dw_scale"_a.none(), "dw_bias"_a.none(), "pw_scale"_a.none(), "pw_bias"_a.none(),
        "residual"_a.none(), "stride"_a, "pad"_a, "dilation"_a, "act"_a, "pw_act"_a, "preact"_a,
        "out"_a.noconvert(), "threads"_a, release);

  nb::class_<effops::dwsep::BlockPlan>(m, "BlockPlan",
                                      "One inverted-residual block's prepared kernel arguments (effops.nn._plan)")
      .def(nb::init<effops::dwsep::Opt, effops::dwsep::Opt, effops::dwsep::Opt, int, effops::CpuArray,
                    effops::dwsep::Opt, effops::dwsep::Opt, int, std::vector<int64_t>, std::vector<int64_t>,
                    effops::dwsep::Opt, effops::dwsep::Opt, int, effops::dwsep::Opt, effops::dwsep::Opt, int,
                    effops::CpuArray, effops::dwsep::Opt, effops::dwsep::Opt, int, bool, std::vector<uintptr_t>,
                    std::vector<uintptr_t>, std::vector<int64_t>>(),
           "expand_w"_a.none(), "expand_scale"_a.none(), "expand_bias"_a.none(), "expand_act"_a, "taps"_a,
           "dw_scale"_a.none(), "dw_bias"_a.none(), "dw_act"_a, "stride"_a, "dilation"_a, "se_reduce_w"_a.none(),
           "se_reduce_b"_a.none(), "se_act"_a, "se_expand_w"_a.none(), "se_expand_b"_a.none(), "se_gate"_a,
           "project_w"_a, "project_scale"_a.none(), "project_bias"_a.none(), "project_act"_a, "residual"_a,
           "sources"_a, "copies"_a, "nbytes"_a)
      .def("run", &effops::dwsep::BlockPlan::run, "x"_a, "out"_a.noconvert(), "pt"_a, "pb"_a, "pl"_a, "pr"_a,
           "threads"_a, release)
      .def("output_hw", &effops::dwsep::BlockPlan::output_hw, "H"_a, "W"_a, "pt"_a, "pb"_a, "pl"_a, "pr"_a)
      .def("unchanged", &effops::dwsep::BlockPlan::unchanged)
      .def("watch_in_place", &effops::dwsep::BlockPlan::watch_in_place, "expand"_a, "project"_a,
           "The expand / projection weights are parameters read in place: snapshot them when packed for AMX")
      .def_prop_rw("fuse_bytes", &effops::dwsep::BlockPlan::fuse_bytes, &effops::dwsep::BlockPlan::set_fuse_bytes,
                   "Band the expand and depthwise convs when one image's expanded map is over this (< 0: never)")
      .def_prop_rw("band_bytes", &effops::dwsep::BlockPlan::band_bytes, &effops::dwsep::BlockPlan::set_band_bytes,
                   "Expanded rows per band, in bytes (>= 1)");

  m.def("fuse_forward", &effops::bifpn::fuse_forward_api, "inputs"_a, "weights"_a, "modes"_a, "act"_a,
        "out"_a.noconvert(), "threads"_a, release);
  m.def("fuse_backward", &effops::bifpn::fuse_backward_api, "grad"_a, "inputs"_a, "weights"_a, "modes"_a,
        "act"_a, "grads"_a.noconvert(), "grad_weights"_a.noconvert(), "threads"_a, release);

  m.def("bn_act_forward", &effops::norm::bn_act_forward_api, "x"_a, "images"_a, "weight"_a.none(), "bias"_a.none(),
        "eps"_a, "act"_a, "y"_a.noconvert(), "mean"_a.noconvert(), "invstd"_a.noconvert(), "var"_a.noconvert(),
        "pooled"_a.none().noconvert(), "threads"_a, release);
  m.def("bn_act_backward", &effops::norm::bn_act_backward_api, "grad"_a, "x"_a, "images"_a, "weight"_a.none(),
        "bias"_a.none(), "mean"_a, "invstd"_a, "grad_pooled"_a.none(), "act"_a, "grad_x"_a.noconvert(),
        "grad_weight"_a.noconvert(), "grad_bias"_a.noconvert(), "threads"_a, release);

  m.def("q_dw_forward", &effops::qconv::q_dw_forward_api, "x"_a, "taps"_a, "bias"_a.none(), "mult"_a,
        "lut"_a.none(), "stride"_a, "pad"_a, "x_zp"_a, "out_zp"_a, "qmin"_a, "qmax"_a, "y"_a.noconvert(),
        "sums"_a.noconvert(), "threads"_a, release);
  m.def("q_pw_forward", &effops::qconv::q_pw_forward_api, "x"_a, "w"_a, "bias"_a.none(), "mult"_a, "lut"_a.none(),
        "gate"_a.none(), "residual"_a.none(), "x_zp"_a, "out_zp"_a, "qmin"_a, "qmax"_a, "res_zp"_a, "res_mult"_a,
        "out"_a.noconvert(), "packed"_a.none(), "threads"_a, release);
  m.def("q_conv_forward", &effops::qconv::q_conv_forward_api, "x"_a, "w"_a, "KH"_a, "KW"_a, "bias"_a.none(), "mult"_a,
        "lut"_a.none(), "stride"_a, "pad"_a, "x_zp"_a, "out_zp"_a, "qmin"_a, "qmax"_a, "out"_a.noconvert(),
        "packed"_a.none(), "threads"_a, release);
  m.def("q_dwsep_forward", &effops::qconv::q_dwsep_forward_api, "x"_a, "taps"_a, "dw_bias"_a.none(), "dw_mult"_a,
        "dw_lut"_a.none(), "pw"_a, "pw_bias"_a.none(), "pw_mult"_a, "lut"_a.none(), "residual"_a.none(),
        "stride"_a, "pad"_a, "x_zp"_a, "dw_zp"_a, "mid_qmin"_a, "mid_qmax"_a, "mid_zp"_a, "out_zp"_a, "qmin"_a, "qmax"_a,
        "res_zp"_a, "res_mult"_a, "out"_a.noconvert(), "pw_packed"_a.none(), "threads"_a, release);
  m.def("q_pw_packed_bytes", &effops::qconv::q_pw_packed_bytes, "Co"_a, "K"_a);
  m.def("q_pw_pack", &effops::qconv::q_pw_pack_api, "w"_a, "bias"_a.none(), "x_zp"_a, "blob"_a.noconvert(), release);
  m.def("q_fuse_forward", &effops::qconv::q_fuse_forward_api, "inputs"_a, "zps"_a, "mults"_a, "modes"_a, "out_zp"_a,
        "qmin"_a, "qmax"_a, "lut"_a.none(), "out"_a.noconvert(), "threads"_a, release);
  m.def("q_quantize", &effops::qconv::q_quantize_api, "x"_a, "out"_a.noconvert(), "scale"_a, "zp"_a, "threads"_a,
        release);
  m.def("q_se_gates", &effops::qconv::q_se_gates_api, "sums"_a, "hw"_a, "zp"_a, "scale"_a, "w1"_a, "b1"_a.none(),
        "act"_a, "w2"_a, "b2"_a.none(), "gate"_a, "out"_a.noconvert(), release);
  namespace qc = effops::qconv;
  nb::class_<qc::QBlockPlan>(m, "QBlockPlan",
                             "One int8 MBConv block's checked kernel arguments (effops.compress._qmodules.QMBConv)")
      .def(nb::init<int64_t, qc::Opt, qc::Opt, qc::Opt, qc::Opt, qc::Opt, std::vector<int64_t>, effops::CpuArray,
                    qc::Opt, effops::CpuArray, qc::Opt, std::vector<int64_t>, std::vector<int64_t>, qc::Opt, qc::Opt, int,
                    qc::Opt, qc::Opt, int, double, effops::CpuArray, qc::Opt, effops::CpuArray, qc::Opt, qc::Opt,
                    std::vector<int64_t>, bool, double>(),
           "x_zp"_a, "expand_w"_a.none(), "expand_bias"_a.none(), "expand_mult"_a.none(), "expand_lut"_a.none(),
           "expand_packed"_a.none(), "expand_cfg"_a, "taps"_a, "dw_bias"_a.none(), "dw_mult"_a, "dw_lut"_a.none(),
           "dw_cfg"_a, "stride"_a, "se_w1"_a.none(), "se_b1"_a.none(), "se_act"_a, "se_w2"_a.none(), "se_b2"_a.none(),
           "se_gate"_a, "dw_scale"_a, "project_w"_a, "project_bias"_a.none(), "project_mult"_a,
           "project_lut"_a.none(), "project_packed"_a.none(), "project_cfg"_a, "residual"_a, "res_mult"_a)
      .def("run", &qc::QBlockPlan::run, "x"_a, "out"_a.noconvert(), "pad"_a, "threads"_a, release)
      .def("output_hw", &qc::QBlockPlan::output_hw, "H"_a, "W"_a, "pad"_a);
  m.def("q_release_scratch", &qc::q_release_scratch, "Free this thread's reused buffers of QBlockPlan.run");
  m.def("set_vnni", &effops::set_vnni, "on"_a, "Use the VNNI dot products in the int8 kernels (where the CPU has them)");
  m.def("vnni_on", &effops::vnni_on, "What set_vnni last asked for");
  m.def("q_isa", &effops::qconv::q_isa_name, "The level the int8 (qconv) kernels run at now");

  namespace ls = effops::losses;
  m.def("focal_loss", &ls::focal_loss_api, "logits"_a, "targets"_a, "ignore"_a.none(), "alpha"_a, "gamma"_a,
        "label_smoothing"_a, "loss_out"_a.noconvert().none(), "partial"_a.noconvert().none(),
        "grad"_a.noconvert().none(), "threads"_a, release);
  m.def("focal_rows_per_task", &ls::focal_rows_per_task, "C"_a);
  m.def("focal_scale", &ls::focal_scale_api, "src"_a, "factor"_a, "dst"_a.noconvert(), "threads"_a, release);
  m.def("box_loss", &ls::box_loss_api, "pred"_a, "target"_a, "mask"_a, "kind"_a, "delta"_a,
        "loss_out"_a.noconvert().none(), "partial"_a.noconvert().none(), "grad"_a.noconvert().none(), "threads"_a,
        release);
  m.def("box_rows_per_task", &ls::box_rows_per_task);
  m.def("match_anchors", &ls::match_anchors_api, "anchors"_a, "gt_boxes"_a, "labels"_a, "valid"_a,
        "match_threshold"_a, "unmatched_threshold"_a, "ignored_class"_a, "cls_out"_a.noconvert(),
        "box_out"_a.noconvert(), "npos_out"_a.noconvert(), "threads"_a, release);

  // effops.nn's prepared-weight cache: are the sources still byte-equal to the copies taken
  // when the kernel arguments were prepared? Raw addresses (Tensor.data_ptr()) of live,
  // contiguous CPU tensors the caller holds, with their byte counts.
  m.def(
      "same_bytes",
      [](const std::vector<uintptr_t>& a, const std::vector<uintptr_t>& b, const std::vector<int64_t>& nbytes) {
        effops::check(a.size() == b.size() && a.size() == nbytes.size(),
                      "same_bytes: a, b and nbytes must have one length");
        for (size_t i = 0; i < a.size(); ++i) {
          effops::check(nbytes[i] >= 0, "same_bytes: nbytes must be >= 0");
          if (nbytes[i] && (a[i] == 0 || b[i] == 0)) effops::fail("same_bytes: null address");
          if (nbytes[i] && std::memcmp(reinterpret_cast<const void*>(a[i]), reinterpret_cast<const void*>(b[i]),
                                       static_cast<size_t>(nbytes[i])) != 0)
            return false;
        }
        return true;
      },
      "a"_a, "b"_a, "nbytes"_a);

  m.def("use_openmp_runtime", &effops::use_openmp_runtime, "path"_a);
  m.def("parallel_runtime", &effops::parallel_runtime);

  m.def("set_isa", &effops::set_isa, "level"_a,
        "Cap the CPU kernels' ISA level (0 baseline, 1 AVX2, 2 AVX-512); returns the level in use");
  m.def("isa", []() { return static_cast<int>(effops::isa()); });
  m.def("set_amx", &effops::set_amx, "on"_a,
        "Turn the AMX kernels (bf16 and int8) on or off; returns whether the bf16 ones run now (CPU, OS and "
        "level allowing)");
  m.def("amx", []() { return effops::amx(); });
  m.def("amx_on", []() { return effops::g_amx_on.load(std::memory_order_relaxed); },
        "What set_amx last asked for (amx() also depends on the CPU and the level)");
  m.def("detected_isa", []() { return static_cast<int>(effops::detected_isa()); });

  m.def("build_info", []() {
    nb::dict d;
    d["version"] = EFFOPS_VERSION;
    d["compiler"] = EFFOPS_CXX_COMPILER;
    d["simd"] = std::string("per-ISA copies chosen at run time; in use: ") + effops::dwsep::cpu_isa_name() +
                " (this CPU: " + effops::isa_name(effops::detected_isa()) + "; EFFOPS_ISA caps it)" +
                (effops::cpu_has_amx_bf16() ? std::string("; AMX bf16 tiles: ") + (effops::amx() ? "in use" : "off")
                                            : std::string("; no AMX")) +
                "; int8 kernels: " + effops::qconv::q_isa_name();
    return d;
  });
}
