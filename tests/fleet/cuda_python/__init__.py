"""Simulated `cuda` package (NVIDIA's cuda-python), installed by tests/fleet/sim.py into each
simulated Jetson's /usr/lib/python3/dist-packages/cuda/: `from cuda import cudart` (cuda-python
11.x/12.x layout). Only what kiln's device-side calibrator uses: cudaMalloc, cudaMemcpy, cudaFree
(docs/trtexec.md §10). "Device memory" is host memory here (ctypes buffers), which the simulated
tensorrt reads back at the returned addresses.
"""
