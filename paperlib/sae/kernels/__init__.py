"""The CPU training step's hot paths: fused C++ kernels, the sparse TopK gradient and the exact fp32 GEMM choice."""
