"""Every numeric tolerance of the suite, in one place.

fp32 equivalence is 1e-5 absolute on every output, on every device. On CUDA the suite turns
TF32 and reduced-precision reductions off (see conftest) so that fp32 really is fp32; without
that, cuBLAS rounds matmul inputs to 10-bit mantissas and differences reach ~1e-3.
"""

FP32_ATOL = {"cpu": 1e-5, "cuda": 1e-5}
#: Image processors: numpy float32 arithmetic on both sides, same PIL resize.
PROCESSOR_ATOL = 1e-5
#: Gradients d(loss)/d(pixel_values) across frameworks, relative to the largest entry.
GRAD_RTOL = 1e-4
#: bf16 round trips are exact (bf16 -> fp32 widening); bf16 *compute* is not compared across frameworks.
