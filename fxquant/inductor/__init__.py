"""How fxquant's ops reach Inductor on the GPU (installed on `import fxquant`: install.py)."""
