"""fxquant's Triton kernels: GPU only, imported lazily by the ops' CUDA implementations."""
