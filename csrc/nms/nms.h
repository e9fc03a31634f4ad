// CPU kernels of the NMS family. Boxes are xyxy, row-major [.., 4]; T is float or double
// (fp16/bf16 inputs are widened to float by the Python layer). All outputs are preallocated by
// the caller (Python, through torch); the functions only fill them.
//
// Semantics shared by every backend (and by the pure-PyTorch reference in ops/nms.py):
//  * greedy order: scores descending, NaN first, ties by lower index (stable);
//  * IoU(i, j) = inter / (area_i + area_j - inter), computed in T exactly as torchvision's CPU
//    kernel does (areas not clamped, inter = max(0, dx) * max(0, dy));
//  * box j is suppressed by an earlier kept box i when IoU(i, j) > iou_threshold, compared in
//    double (the threshold is a double);
//  * so NaN IoU never suppresses, a threshold >= 1 never suppresses and a negative one
//    suppresses everything whose IoU with a kept box is not NaN.
#pragma once
#include <cstdint>

namespace effops::nms {

// Greedy NMS; writes the kept indices (score order) to keep_out[0..K) and returns K.
template <class T>
int64_t nms(const T* boxes, const T* scores, int64_t n, double iou_threshold, int64_t* keep_out,
            int threads);

// Per-class greedy NMS: a box only suppresses boxes with the same idxs value. The kept indices
// are written in score order (descending, NaN first, ties by lower index). Classes run in
// parallel.
template <class T>
int64_t batched_nms(const T* boxes, const T* scores, const int64_t* idxs, int64_t n,
                    double iou_threshold, int64_t* keep_out, int threads);

// Detector post-processing for B images with N anchors and C classes.
// boxes: [B, N, 4] (shared by all classes) or [B, N, C, 4] (per_class_boxes); scores [B, N, C].
// Candidates are (anchor, class) pairs with score > score_threshold; when pre_nms_top_k >= 0
// only the pre_nms_top_k best of them (score desc, then flat index n*C+c asc) go on. Greedy NMS
// runs per class (or across classes when class_agnostic). Detections are ordered by score desc,
// then flat index asc, and the first max_out are written; the rest of each row is padding
// (boxes 0, scores 0, classes -1, indices -1).
template <class T>
void multiclass_nms(const T* boxes, bool per_class_boxes, const T* scores, int64_t B, int64_t N,
                    int64_t C, double iou_threshold, double score_threshold, int64_t pre_nms_top_k,
                    int64_t max_out, bool class_agnostic, int64_t* num_out, T* boxes_out,
                    T* scores_out, int64_t* classes_out, int64_t* indices_out, int threads);

// Soft-NMS (Bodla et al. 2017). method 0 = linear: s *= 1 - IoU when IoU > iou_threshold;
// method 1 = gaussian: s *= exp(-IoU^2 / sigma) for every overlapping box. The box with the
// highest current score (ties: lower index) is selected next; selection stops when that score is
// below score_threshold. Writes selected indices and their scores at selection; returns count.
template <class T>
int64_t soft_nms(const T* boxes, const T* scores, int64_t n, double iou_threshold, double sigma,
                 int method, double score_threshold, int64_t* keep_out, T* scores_out,
                 int threads);

// Matrix NMS (SOLOv2): for each box j, decay_j = min(1, min over higher-scored i of the same
// class of f(IoU_ij) / f(cmax_i)), cmax_i = max IoU of i with any higher-scored box of its
// class; kernel 0 = linear f(x) = 1 - x, kernel 1 = gaussian f(x) = exp(-sigma x^2).
// Writes score_j * decay_j for every box, in input order. idxs may be null (one class).
template <class T>
void matrix_nms(const T* boxes, const T* scores, const int64_t* idxs, int64_t n, int kernel,
                double sigma, T* decayed_out, int threads);

}  // namespace effops::nms
