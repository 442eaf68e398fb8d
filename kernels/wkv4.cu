// RWKV-4 WKV with the running-max (aa, bb, pp) state of the official package, forward and backward.
//
// One thread per (batch, channel), sequential in time. Matches ops_rwkv_hf.wkv4_recurrent step for step:
//   ww = u + k_t;  q = max(pp, ww);  y_t = (e^{pp-q} aa + e^{ww-q} v_t) / (e^{pp-q} bb + e^{ww-q})
//   ww = w + pp;   q = max(ww, k_t); aa = e^{ww-q} aa + e^{k_t-q} v_t;  bb = e^{ww-q} bb + e^{k_t-q};  pp = q
// The backward is the exact reverse-mode derivative of those steps (torch.maximum's tie rule included): the
// forward stores (aa, bb, pp) before every K4-th token, the backward recomputes K4 steps from each
// checkpoint into registers and walks them in reverse.
#include "wkv_common.cuh"

namespace rwkv_hf_wkv {

template <typename F>
__global__ void __launch_bounds__(128) wkv4_forward_kernel(int B, int T, int C, const float* __restrict__ w_,
                                                           const float* __restrict__ u_, const F* __restrict__ k_,
                                                           const F* __restrict__ v_, const float* __restrict__ s0_,
                                                           float* __restrict__ y_, float* __restrict__ sT_,
                                                           float* __restrict__ ckpt_) {
    const i64 idx = i64(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= i64(B) * C) return;
    const int b = int(idx / C), c = int(idx % C);
    const float w = w_[c], u = u_[c];
    const float* s0 = s0_ + i64(b) * 3 * C + c;
    float aa = s0[0], bb = s0[C], pp = s0[2 * C];
    const int nck = (T + K4 - 1) / K4;
    const i64 base = i64(b) * T * C + c;
    for (int t = 0; t < T; ++t) {
        if (ckpt_ != nullptr && t % K4 == 0) {
            float* ck = ckpt_ + (i64(b) * nck + t / K4) * 3 * C + c;
            ck[0] = aa;
            ck[C] = bb;
            ck[2 * C] = pp;
        }
        const i64 i = base + i64(t) * C;
        const float kt = to_float(k_[i]), vt = to_float(v_[i]);
        float ww = u + kt;
        float q = fmaxf(pp, ww);
        float e1 = expf(pp - q), e2 = expf(ww - q);
        y_[i] = (e1 * aa + e2 * vt) / (e1 * bb + e2);
        ww = w + pp;
        q = fmaxf(ww, kt);
        e1 = expf(ww - q);
        e2 = expf(kt - q);
        aa = e1 * aa + e2 * vt;
        bb = e1 * bb + e2;
        pp = q;
    }
    float* sT = sT_ + i64(b) * 3 * C + c;
    sT[0] = aa;
    sT[C] = bb;
    sT[2 * C] = pp;
}

// Gradient of q = max(x, y) as torch.maximum defines it: all to the larger, half each on a tie.
__device__ __forceinline__ void max_backward(float x, float y, float g, float& gx, float& gy) {
    if (x > y) {
        gx += g;
    } else if (x < y) {
        gy += g;
    } else {
        gx += 0.5f * g;
        gy += 0.5f * g;
    }
}

template <typename F>
__global__ void __launch_bounds__(128) wkv4_backward_kernel(
    int B, int T, int C, const float* __restrict__ w_, const float* __restrict__ u_, const F* __restrict__ k_,
    const F* __restrict__ v_, const float* __restrict__ ckpt_, const float* __restrict__ gy_,
    const float* __restrict__ gsT_, float* __restrict__ gw_part_, float* __restrict__ gu_part_,
    float* __restrict__ gk_, float* __restrict__ gv_, float* __restrict__ gs0_) {
    const i64 idx = i64(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= i64(B) * C) return;
    const int b = int(idx / C), c = int(idx % C);
    const float w = w_[c], u = u_[c];
    const int nck = (T + K4 - 1) / K4;
    const i64 base = i64(b) * T * C + c;
    const float* gsT = gsT_ + i64(b) * 3 * C + c;
    float gaa = gsT[0], gbb = gsT[C], gpp = gsT[2 * C];
    float gw = 0.f, gu = 0.f;
    float A[K4], Bs[K4], P[K4];  // the state before each token of the chunk
    for (int ci = nck - 1; ci >= 0; --ci) {
        const int t0 = ci * K4;
        const float* ck = ckpt_ + (i64(b) * nck + ci) * 3 * C + c;
        float aa = ck[0], bb = ck[C], pp = ck[2 * C];
#pragma unroll
        for (int m = 0; m < K4; ++m) {
            const int t = t0 + m;
            if (t < T) {
                A[m] = aa;
                Bs[m] = bb;
                P[m] = pp;
                const i64 i = base + i64(t) * C;
                const float kt = to_float(k_[i]), vt = to_float(v_[i]);
                const float ww = w + pp;
                const float q = fmaxf(ww, kt);
                const float e1 = expf(ww - q), e2 = expf(kt - q);
                aa = e1 * aa + e2 * vt;
                bb = e1 * bb + e2;
                pp = q;
            }
        }
#pragma unroll
        for (int m = K4 - 1; m >= 0; --m) {
            const int t = t0 + m;
            if (t < T) {
                const float aa = A[m], bb = Bs[m], pp = P[m];
                const i64 i = base + i64(t) * C;
                const float kt = to_float(k_[i]), vt = to_float(v_[i]);
                const float gyt = gy_[i];
                float gk = 0.f, gv = 0.f;
                // State update: aa' = f1 aa + f2 v, bb' = f1 bb + f2, pp' = q2 = max(w + pp, k).
                const float ww2 = w + pp;
                const float q2 = fmaxf(ww2, kt);
                const float f1 = expf(ww2 - q2), f2 = expf(kt - q2);
                const float gf1 = gaa * aa + gbb * bb, gf2 = gaa * vt + gbb;
                float n_gaa = gaa * f1, n_gbb = gbb * f1;
                gv += gaa * f2;
                float gww2 = gf1 * f1;
                gk += gf2 * f2;
                const float gq2 = gpp - gf1 * f1 - gf2 * f2;
                max_backward(ww2, kt, gq2, gww2, gk);
                gw += gww2;
                float n_gpp = gww2;
                // Output: y = (e1 aa + e2 v) / (e1 bb + e2), e1 = e^{pp-q}, e2 = e^{u+k-q}, q = max(pp, u+k).
                const float wu = u + kt;
                const float q = fmaxf(pp, wu);
                const float e1 = expf(pp - q), e2 = expf(wu - q);
                const float num = e1 * aa + e2 * vt, den = e1 * bb + e2;
                const float gnum = gyt / den, gden = -gyt * num / (den * den);
                const float ge1 = gnum * aa + gden * bb, ge2 = gnum * vt + gden;
                n_gaa += gnum * e1;
                n_gbb += gden * e1;
                gv += gnum * e2;
                float gpp_o = ge1 * e1, gwu = ge2 * e2;
                max_backward(pp, wu, -(ge1 * e1) - (ge2 * e2), gpp_o, gwu);
                n_gpp += gpp_o;
                gu += gwu;
                gk += gwu;
                gk_[i] = gk;
                gv_[i] = gv;
                gaa = n_gaa;
                gbb = n_gbb;
                gpp = n_gpp;
            }
        }
    }
    float* gs0 = gs0_ + i64(b) * 3 * C + c;
    gs0[0] = gaa;
    gs0[C] = gbb;
    gs0[2 * C] = gpp;
    gw_part_[idx] = gw;
    gu_part_[idx] = gu;
}

static inline dim3 wkv4_grid(int B, int C) { return dim3(unsigned((i64(B) * C + 127) / 128)); }

const char* wkv4_forward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                         const void* v, const float* s0, float* y, float* sT, float* ckpt, cudaStream_t stream) {
    WKV_DISPATCH_DTYPE(dtype, WKV_LAUNCH(wkv4_grid(B, C), dim3(128), stream, wkv4_forward_kernel<F>)(
                                  B, T, C, w, u, (const F*)k, (const F*)v, s0, y, sT, ckpt));
    return WKV_LAUNCH_ERROR();
}

const char* wkv4_backward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                          const void* v, const float* ckpt, const float* gy, const float* gsT, float* gw_part,
                          float* gu_part, float* gk, float* gv, float* gs0, cudaStream_t stream) {
    WKV_DISPATCH_DTYPE(dtype, WKV_LAUNCH(wkv4_grid(B, C), dim3(128), stream, wkv4_backward_kernel<F>)(
                                  B, T, C, w, u, (const F*)k, (const F*)v, ckpt, gy, gsT, gw_part, gu_part, gk,
                                  gv, gs0));
    return WKV_LAUNCH_ERROR();
}

}  // namespace rwkv_hf_wkv
