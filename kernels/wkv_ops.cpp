// Python binding of the rwkv_hf WKV kernels (pybind11 module built by torch.utils.cpp_extension.load).
//
// Every function takes contiguous tensors already in the kernel layout (rwkv_hf/kernels_rwkv_hf.py prepares
// them), allocates only its outputs, launches on the current CUDA stream and never synchronises, so the ops
// can be captured in CUDA graphs. Built with -DWKV_HOST_EMU (tests only) the same file binds the CPU
// emulation of the kernels and accepts CPU tensors.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#ifndef WKV_HOST_EMU
// Only c10/cuda (needs cuda_runtime_api.h alone), not ATen/cuda/CUDAContext.h (which also pulls in the
// cuBLAS / cuSPARSE headers), so the binding builds with a minimal CUDA toolkit.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "wkv_launchers.h"

namespace {

using torch::Tensor;
namespace W = rwkv_hf_wkv;

#ifdef WKV_HOST_EMU
struct DeviceScope {
    explicit DeviceScope(const Tensor&) {}
    cudaStream_t stream() const { return nullptr; }
};
#define WKV_CHECK_DEVICE(x) TORCH_CHECK((x).device().is_cpu(), "rwkv_hf WKV (host emulation): " #x " must be a CPU tensor")
#else
struct DeviceScope {
    c10::cuda::CUDAGuard guard;
    explicit DeviceScope(const Tensor& t) : guard(t.device()) {}
    cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
};
#define WKV_CHECK_DEVICE(x) TORCH_CHECK((x).is_cuda(), "rwkv_hf WKV kernels: " #x " must be a CUDA tensor, got ", (x).device())
#endif

#define WKV_CHECK(x, dt)                                                                                  \
    do {                                                                                                  \
        WKV_CHECK_DEVICE(x);                                                                              \
        TORCH_CHECK((x).is_contiguous(), "rwkv_hf WKV kernels: " #x " must be contiguous");               \
        TORCH_CHECK((x).scalar_type() == (dt), "rwkv_hf WKV kernels: " #x " must be ", (dt), ", got ",    \
                    (x).scalar_type());                                                                   \
    } while (0)

#define WKV_CHECK_SHAPE(x, ...)                                                                           \
    TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "rwkv_hf WKV kernels: " #x " has shape ", \
                (x).sizes(), ", expected ", at::IntArrayRef({__VA_ARGS__}))

int dtype_code(const Tensor& x) {
    switch (x.scalar_type()) {
        case at::kFloat: return W::kFloat32;
        case at::kHalf: return W::kFloat16;
        case at::kBFloat16: return W::kBFloat16;
        default:
            TORCH_CHECK(false, "rwkv_hf WKV kernels: unsupported input dtype ", x.scalar_type(),
                        " (supported: float32, float16, bfloat16)");
    }
    return -1;
}

void check_result(const char* err, const char* op) {
    TORCH_CHECK(err == nullptr, "rwkv_hf ", op, ": ", err == nullptr ? "" : err);
}

Tensor empty_f32(at::IntArrayRef shape, const Tensor& like) {
    return torch::empty(shape, like.options().dtype(at::kFloat));
}

float* opt_ptr(const Tensor& t) { return t.numel() > 0 ? t.data_ptr<float>() : nullptr; }

// The v7 kernels move state rows as float4: a (contiguous) view starting off a 16-byte boundary is copied.
Tensor aligned16(const Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

// ---------------------------------------------------------------------------------------------- RWKV-4

std::vector<Tensor> wkv4_forward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor state, bool need_backward) {
    const auto dt = k.scalar_type();
    WKV_CHECK(k, dt);
    WKV_CHECK(v, dt);
    WKV_CHECK(w, at::kFloat);
    WKV_CHECK(u, at::kFloat);
    WKV_CHECK(state, at::kFloat);
    TORCH_CHECK(k.dim() == 3, "rwkv_hf wkv4: k must be [B, T, C]");
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    WKV_CHECK_SHAPE(v, B, T, C);
    WKV_CHECK_SHAPE(w, C);
    WKV_CHECK_SHAPE(u, C);
    WKV_CHECK_SHAPE(state, B, 3, C);
    DeviceScope scope(k);
    Tensor y = empty_f32({B, T, C}, k);
    Tensor sT = empty_f32({B, 3, C}, k);
    const int64_t nck = (T + W::K4 - 1) / W::K4;
    Tensor ckpt = empty_f32({need_backward ? B : 0, nck, 3, C}, k);
    check_result(W::wkv4_forward(dtype_code(k), B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(),
                                 v.data_ptr(), state.data_ptr<float>(), y.data_ptr<float>(), sT.data_ptr<float>(),
                                 opt_ptr(ckpt), scope.stream()),
                 "wkv4_forward");
    return {y, sT, ckpt};
}

std::vector<Tensor> wkv4_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor ckpt, Tensor gy, Tensor gsT) {
    const auto dt = k.scalar_type();
    WKV_CHECK(k, dt);
    WKV_CHECK(v, dt);
    WKV_CHECK(w, at::kFloat);
    WKV_CHECK(u, at::kFloat);
    WKV_CHECK(ckpt, at::kFloat);
    WKV_CHECK(gy, at::kFloat);
    WKV_CHECK(gsT, at::kFloat);
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    WKV_CHECK_SHAPE(ckpt, B, (T + W::K4 - 1) / W::K4, 3, C);
    WKV_CHECK_SHAPE(gy, B, T, C);
    WKV_CHECK_SHAPE(gsT, B, 3, C);
    DeviceScope scope(k);
    Tensor gw = empty_f32({B, C}, k), gu = empty_f32({B, C}, k);
    Tensor gk = empty_f32({B, T, C}, k), gv = empty_f32({B, T, C}, k), gs0 = empty_f32({B, 3, C}, k);
    check_result(W::wkv4_backward(dtype_code(k), B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(),
                                  v.data_ptr(), ckpt.data_ptr<float>(), gy.data_ptr<float>(), gsT.data_ptr<float>(),
                                  gw.data_ptr<float>(), gu.data_ptr<float>(), gk.data_ptr<float>(),
                                  gv.data_ptr<float>(), gs0.data_ptr<float>(), scope.stream()),
                 "wkv4_backward");
    return {gw.sum(0), gu.sum(0), gk, gv, gs0};
}

// ---------------------------------------------------------------------------------------------- RWKV-5.2 / 6

void check_wkv5_inputs(const Tensor& r, const Tensor& k, const Tensor& v, const Tensor& log_w, int64_t lw_sb,
                       int64_t lw_st, const Tensor& u, const Tensor& state) {
    const auto dt = r.scalar_type();
    WKV_CHECK(r, dt);
    WKV_CHECK(k, dt);
    WKV_CHECK(v, dt);
    WKV_CHECK(log_w, at::kFloat);
    WKV_CHECK(u, at::kFloat);
    WKV_CHECK(state, at::kFloat);
    TORCH_CHECK(r.dim() == 4, "rwkv_hf wkv5: r must be [B, T, H, N]");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    WKV_CHECK_SHAPE(k, B, T, H, N);
    WKV_CHECK_SHAPE(v, B, T, H, N);
    WKV_CHECK_SHAPE(u, H, N);
    WKV_CHECK_SHAPE(state, B, H, N, N);
    TORCH_CHECK(lw_sb >= 0 && lw_st >= 0, "rwkv_hf wkv5: negative log_w strides");
    // The furthest element the kernels read must lie inside log_w.
    const int64_t last = (B - 1) * lw_sb + (T - 1) * lw_st + H * N;
    TORCH_CHECK(B == 0 || T == 0 || last <= log_w.numel(), "rwkv_hf wkv5: log_w (", log_w.numel(),
                " elements) is too small for strides (", lw_sb, ", ", lw_st, ")");
}

std::vector<Tensor> wkv5_forward(Tensor r, Tensor k, Tensor v, Tensor log_w, int64_t lw_sb, int64_t lw_st,
                                 Tensor u, Tensor state) {
    check_wkv5_inputs(r, k, v, log_w, lw_sb, lw_st, u, state);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    DeviceScope scope(r);
    Tensor y = empty_f32({B, T, H, N}, r);
    Tensor sT = empty_f32({B, H, N, N}, r);
    check_result(W::wkv5_forward(dtype_code(r), B, T, H, N, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                 log_w.data_ptr<float>(), lw_sb, lw_st, u.data_ptr<float>(),
                                 state.data_ptr<float>(), y.data_ptr<float>(), sT.data_ptr<float>(),
                                 scope.stream()),
                 "wkv5_forward");
    return {y, sT};
}

std::vector<Tensor> wkv5_backward(Tensor r, Tensor k, Tensor v, Tensor log_w, int64_t lw_sb, int64_t lw_st,
                                  Tensor u, Tensor state, Tensor gy, Tensor gsT) {
    check_wkv5_inputs(r, k, v, log_w, lw_sb, lw_st, u, state);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    WKV_CHECK(gy, at::kFloat);
    WKV_CHECK(gsT, at::kFloat);
    WKV_CHECK_SHAPE(gy, B, T, H, N);
    WKV_CHECK_SHAPE(gsT, B, H, N, N);
    DeviceScope scope(r);
    Tensor gr = empty_f32({B, T, H, N}, r), gk = empty_f32({B, T, H, N}, r), gv = empty_f32({B, T, H, N}, r);
    Tensor glw = empty_f32({B, T, H, N}, r), gu = empty_f32({B, H, N}, r), gs0 = empty_f32({B, H, N, N}, r);
    check_result(W::wkv5_backward(dtype_code(r), B, T, H, N, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                  log_w.data_ptr<float>(), lw_sb, lw_st, u.data_ptr<float>(),
                                  state.data_ptr<float>(), gy.data_ptr<float>(), gsT.data_ptr<float>(),
                                  gr.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(),
                                  glw.data_ptr<float>(), gu.data_ptr<float>(), gs0.data_ptr<float>(),
                                  scope.stream()),
                 "wkv5_backward");
    return {gr, gk, gv, glw, gu.sum(0), gs0};
}

// ---------------------------------------------------------------------------------------------- RWKV-7

void check_wkv7_inputs(const Tensor& r, const Tensor& log_w, const Tensor& k, const Tensor& v, const Tensor& a,
                       const Tensor& b) {
    const auto dt = r.scalar_type();
    WKV_CHECK(r, dt);
    WKV_CHECK(k, dt);
    WKV_CHECK(v, dt);
    WKV_CHECK(a, dt);
    WKV_CHECK(b, dt);
    WKV_CHECK(log_w, at::kFloat);
    TORCH_CHECK(r.dim() == 4, "rwkv_hf wkv7: r must be [B, T, H, N]");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    WKV_CHECK_SHAPE(log_w, B, T, H, N);
    WKV_CHECK_SHAPE(k, B, T, H, N);
    WKV_CHECK_SHAPE(v, B, T, H, N);
    WKV_CHECK_SHAPE(a, B, T, H, N);
    WKV_CHECK_SHAPE(b, B, T, H, N);
}

std::vector<Tensor> wkv7_forward(Tensor r, Tensor log_w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor state,
                                 bool need_backward) {
    check_wkv7_inputs(r, log_w, k, v, a, b);
    WKV_CHECK(state, at::kFloat);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    WKV_CHECK_SHAPE(state, B, H, N, N);
    DeviceScope scope(r);
    state = aligned16(state);
    Tensor y = empty_f32({B, T, H, N}, r);
    Tensor sT = empty_f32({B, H, N, N}, r);
    const int64_t nck = (T + W::K7 - 1) / W::K7;
    Tensor ckpt = empty_f32({need_backward ? B : 0, H, nck, N, N}, r);
    Tensor sa = empty_f32({need_backward ? B : 0, T, H, N}, r);
    check_result(W::wkv7_forward(dtype_code(r), B, T, H, N, r.data_ptr(), log_w.data_ptr<float>(), k.data_ptr(),
                                 v.data_ptr(), a.data_ptr(), b.data_ptr(), state.data_ptr<float>(),
                                 y.data_ptr<float>(), sT.data_ptr<float>(), opt_ptr(ckpt), opt_ptr(sa),
                                 scope.stream()),
                 "wkv7_forward");
    return {y, sT, ckpt, sa};
}

std::vector<Tensor> wkv7_backward(Tensor r, Tensor log_w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor gy,
                                  Tensor gsT, Tensor ckpt, Tensor sa) {
    check_wkv7_inputs(r, log_w, k, v, a, b);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    WKV_CHECK(gy, at::kFloat);
    WKV_CHECK(gsT, at::kFloat);
    WKV_CHECK(ckpt, at::kFloat);
    WKV_CHECK(sa, at::kFloat);
    WKV_CHECK_SHAPE(gy, B, T, H, N);
    WKV_CHECK_SHAPE(gsT, B, H, N, N);
    WKV_CHECK_SHAPE(ckpt, B, H, (T + W::K7 - 1) / W::K7, N, N);
    WKV_CHECK_SHAPE(sa, B, T, H, N);
    DeviceScope scope(r);
    gsT = aligned16(gsT);
    Tensor scratch = empty_f32({B, H, W::K7, N, N}, r);
    Tensor dsa = empty_f32({B, T, H, N}, r);
    Tensor gr = empty_f32({B, T, H, N}, r), glw = empty_f32({B, T, H, N}, r), gk = empty_f32({B, T, H, N}, r);
    Tensor gv = empty_f32({B, T, H, N}, r), ga = empty_f32({B, T, H, N}, r), gb = empty_f32({B, T, H, N}, r);
    Tensor gs0 = empty_f32({B, H, N, N}, r);
    check_result(W::wkv7_backward(dtype_code(r), B, T, H, N, r.data_ptr(), log_w.data_ptr<float>(), k.data_ptr(),
                                  v.data_ptr(), a.data_ptr(), b.data_ptr(), gy.data_ptr<float>(),
                                  gsT.data_ptr<float>(), ckpt.data_ptr<float>(), sa.data_ptr<float>(),
                                  scratch.data_ptr<float>(), dsa.data_ptr<float>(), gr.data_ptr<float>(),
                                  glw.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(),
                                  ga.data_ptr<float>(), gb.data_ptr<float>(), gs0.data_ptr<float>(), scope.stream()),
                 "wkv7_backward");
    return {gr, glw, gk, gv, ga, gb, gs0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "rwkv_hf WKV kernels (RWKV-4, RWKV-5.2/6, RWKV-7): forward and backward with state in/out";
    m.attr("K4") = W::K4;
    m.attr("K7") = W::K7;
#ifdef WKV_HOST_EMU
    m.attr("host_emulation") = true;
#else
    m.attr("host_emulation") = false;
#endif
    m.def("wkv4_forward", &wkv4_forward, "RWKV-4 WKV forward -> (y, state_out, checkpoints)");
    m.def("wkv4_backward", &wkv4_backward, "RWKV-4 WKV backward -> (gw, gu, gk, gv, gstate)");
    m.def("wkv5_forward", &wkv5_forward, "RWKV-5.2/6 WKV forward -> (y, state_out)");
    m.def("wkv5_backward", &wkv5_backward, "RWKV-5.2/6 WKV backward -> (gr, gk, gv, glog_w, gu, gstate)");
    m.def("wkv7_forward", &wkv7_forward, "RWKV-7 WKV forward -> (y, state_out, checkpoints, sa)");
    m.def("wkv7_backward", &wkv7_backward, "RWKV-7 WKV backward -> (gr, glog_w, gk, gv, ga, gb, gstate)");
}
