"""Simulated cuda-python runtime API (`cuda.cudart`): every call returns a tuple whose first item
is a cudaError_t, as the real bindings do (`err, ptr = cudart.cudaMalloc(n)`)."""
import ctypes
import enum


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


_buffers = {}


def cudaMalloc(size):
    if int(size) <= 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    buf = ctypes.create_string_buffer(int(size))
    ptr = ctypes.addressof(buf)
    _buffers[ptr] = buf
    return cudaError_t.cudaSuccess, ptr


def cudaFree(ptr):
    if _buffers.pop(int(ptr), None) is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (cudaError_t.cudaSuccess,)


def cudaMemcpy(dst, src, count, kind):
    if int(dst) in _buffers and len(_buffers[int(dst)]) < int(count):
        return (cudaError_t.cudaErrorInvalidValue,)
    ctypes.memmove(int(dst), int(src), int(count))
    return (cudaError_t.cudaSuccess,)


def cudaGetErrorString(error):
    return cudaError_t.cudaSuccess, cudaError_t(int(error)).name.encode()
