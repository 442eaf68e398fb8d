// CPU emulation of the small subset of CUDA the WKV kernels use, for tests on machines without a GPU.
//
// Compiled only when WKV_HOST_EMU is defined (never by nvcc). Every block of a launch runs in turn; the
// threads of one block run as std::threads that meet at __syncthreads() on a barrier; __shared__ arrays
// become function-local statics, which is correct because only one block runs at a time. This lets the
// exact kernel source be executed on the CPU and compared with the PyTorch reference ops.
#pragma once
#ifndef WKV_HOST_EMU
#error "wkv_host_emu.h is for host emulation builds only"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <math.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef void* cudaStream_t;
struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

namespace wkv_emu {

class Barrier {
  public:
    explicit Barrier(unsigned n) : n_(n) {}
    void wait() {
        std::unique_lock<std::mutex> lock(m_);
        unsigned gen = gen_;
        if (++count_ == n_) {
            count_ = 0;
            ++gen_;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return gen != gen_; });
        }
    }

  private:
    std::mutex m_;
    std::condition_variable cv_;
    unsigned n_, count_ = 0, gen_ = 0;
};

inline thread_local Barrier* tl_barrier = nullptr;

template <typename... P>
struct Launch {
    dim3 grid, block;
    void (*fn)(P...);
    template <typename... A>
    void operator()(A&&... args) const {
        const unsigned nthreads = block.x * block.y * block.z;
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    Barrier bar(nthreads);
                    std::vector<std::thread> threads;
                    threads.reserve(nthreads);
                    for (unsigned tz = 0; tz < block.z; ++tz)
                        for (unsigned ty = 0; ty < block.y; ++ty)
                            for (unsigned tx = 0; tx < block.x; ++tx)
                                threads.emplace_back([&, tx, ty, tz, bx, by, bz] {
                                    set_indices(dim3(tx, ty, tz), dim3(bx, by, bz), block, grid);
                                    tl_barrier = &bar;
                                    fn(static_cast<P>(args)...);
                                });
                    for (auto& t : threads) t.join();
                }
    }
    static void set_indices(dim3 t, dim3 b, dim3 bd, dim3 gd);
};

template <typename... P>
Launch<P...> launcher(dim3 grid, dim3 block, void (*fn)(P...)) {
    return Launch<P...>{grid, block, fn};
}

}  // namespace wkv_emu

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename... P>
void wkv_emu::Launch<P...>::set_indices(dim3 t, dim3 b, dim3 bd, dim3 gd) {
    threadIdx = t;
    blockIdx = b;
    blockDim = bd;
    gridDim = gd;
}

inline void __syncthreads() { wkv_emu::tl_barrier->wait(); }
inline float __expf(float x) { return std::exp(x); }

typedef c10::BFloat16 wkv_bf16;
typedef c10::Half wkv_fp16;
inline float to_float(float x) { return x; }
inline float to_float(wkv_bf16 x) { return static_cast<float>(x); }
inline float to_float(wkv_fp16 x) { return static_cast<float>(x); }

#define WKV_LAUNCH(grid, block, stream, ...) ::wkv_emu::launcher(grid, block, __VA_ARGS__)
#define WKV_LAUNCH_ERROR() ((const char*)nullptr)
