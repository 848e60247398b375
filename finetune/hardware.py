"""The device and precision a run trains on, and the CPU allocator setting that keeps CPU steps fast."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    channels_last: bool

    @property
    def needs_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        precision = {None: "fp32", torch.bfloat16: "bf16 mixed", torch.float16: "fp16 mixed + grad scaler"}[self.amp_dtype]
        return f"{self.device} ({precision}{', channels-last' if self.channels_last else ''})"


def resolve_hardware(device: str | None, amp: bool | None, channels_last: bool | None) -> Hardware:
    """CUDA when present; there, mixed precision (bf16 where supported) and channels-last by default."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        from zoo.errors import UserInputError

        raise UserInputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    on_gpu = dev.type == "cuda"
    use_amp = on_gpu if amp is None else amp
    amp_dtype = None
    if use_amp:
        amp_dtype = torch.bfloat16 if (not on_gpu or torch.cuda.is_bf16_supported()) else torch.float16
    return Hardware(dev, amp_dtype, on_gpu if channels_last is None else channels_last)


def keep_cpu_heap() -> bool:
    """glibc malloc: never trim the heap nor serve large blocks with mmap, so that memory a
    training step frees is reused by the next one rather than returned and faulted in again.

    With glibc's adaptive defaults a CPU training step can take 10^4-10^5 page faults
    (0.1-0.8 GB zeroed again per step), depending on the process's allocation history;
    without them CPU time per step fell 2-14% in bench/bench_train.py. The cost: the
    process keeps its peak memory. Returns False where this is not glibc on Linux.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_trim_threshold, 2 ** 31 - 1)) and bool(mallopt(m_mmap_max, 0))
