"""The profile's kernel classes (bench/bench_speed.py), on kernel names from an H200 profile.

The first GPU profile put cuDNN's convolutions under gsplat: their names carry ``tilesize``, which
the gsplat pattern's ``tile`` matched, and the table showed 0.3 % convolution and 10 % gsplat."""

import pytest

from bench.bench_speed import classify

NAMES = {
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x128x64_warpgro": "convolution",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x128x64_warpgr": "convolution",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, fal": "convolution",
    "void gsplat::intersect_tile_kernel<float>(bool, unsigned int, unsigned int, unsigned int, ": "gsplat",
    "void gsplat::rasterize_to_pixels_3dgs_bwd_kernel<4u, float>(unsigned int, unsigned int, un": "gsplat",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x": "attention",
    "nvjet_sm90_tst_192x208_64x4_1x2_h_bz_coopB_NNT": "GEMM",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float": "other",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std:": "other",
}


@pytest.mark.parametrize("kernel", sorted(NAMES))
def test_kernel_class(kernel):
    assert classify(kernel).startswith(NAMES[kernel])
