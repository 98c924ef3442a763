"""How fxquant's ops reach Inductor on the GPU (imported by the backend only for CUDA graphs)."""
