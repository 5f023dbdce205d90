"""A CPU run that behaves, for device placement, as if the model and the batch were on a GPU.

On a CUDA run a tensor made by a factory without `device=` (torch.tensor, arange, zeros, ...) is on the CPU, and
CUDA refuses an op that mixes it with the GPU's tensors. On a CPU-only machine every tensor is on the CPU, so
such a bug cannot fail a test. `HostTensorProbe` tells the two apart again: tensors that exist when it starts
(model weights, the batch Lightning moved) stand for GPU tensors; tensors a factory makes inside it without a
device, `.cpu()` / `.to("cpu")` copies, what is computed from those alone and what shares their memory are host
tensors; `.to(device)` / `.cuda()` copies one to the "GPU". An op that mixes a host tensor with GPU ones where
CUDA would raise is recorded with the line of this repository's code that called it; the memory that new GPU
tensors take is counted (a copy of the model on its own device shows there). torch's own list of factories
(`_device_constructors`) is the one its default-device context uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

REPO = Path(__file__).resolve().parents[1]
FACTORIES = _device_constructors() | {torch.from_numpy}
MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
# CUDA accepts CPU index tensors into a GPU tensor (they are copied over); a value set there must be on the GPU.
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put}
HOST = "_probe_on_host"


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _caller() -> str:
    """The innermost line of this repository's own code (not tests) on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path.parent == REPO:
            return f"{path.name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _name(func) -> str:
    return getattr(func, "__qualname__", getattr(func, "__name__", str(func)))


class HostTensorProbe(TorchFunctionMode):
    """Records (function, caller) for every op that would mix CPU and GPU tensors on a GPU run; see the module."""

    def __init__(self):
        super().__init__()
        self.mixed: list[tuple[str, str]] = []
        self.host_made = 0  # host tensors made by factories: shows that the probe saw the code run
        self.gpu_bytes_made = 0  # memory that new GPU tensors took
        self._host_memory: set[int] = set()
        self._alive: list[torch.Tensor] = []  # host tensors stay alive, so that no GPU tensor reuses their memory

    def on_host(self, t: torch.Tensor) -> bool:
        """Whether `t` is a CPU tensor of the emulated GPU run: by its mark, else (a tensor made where the probe
        cannot see, e.g. an nn.Parameter wrapped around host data) by its memory."""
        host = getattr(t, HOST, None)
        return _storage(t) in self._host_memory if host is None else host

    def _mark(self, obj, host: bool) -> None:
        for t in _tensors(obj):
            setattr(t, HOST, host)
            if host and _storage(t):  # (every empty tensor has address 0)
                self._host_memory.add(_storage(t))
                self._alive.append(t)

    def _target_is_host(self, args, kwargs) -> bool | None:
        """Where `.to(...)` sends a tensor: the CPU for "cpu" spelled as a string; the GPU for a torch.device (the
        code's `x.device`, `self.device`: the GPU on a real run); another tensor's side; None for a dtype alone."""
        for value in [*args, kwargs.get("device"), kwargs.get("other")]:
            if isinstance(value, str):
                return value.startswith("cpu")
            if isinstance(value, torch.device):
                return False
            if isinstance(value, torch.Tensor):
                return self.on_host(value)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            given = kwargs.get("device")
            if given is not None:
                self._mark(out, isinstance(given, str) and given.startswith("cpu"))
            elif not (func in (torch.as_tensor, torch.asarray) and isinstance(args[0], torch.Tensor)):
                self.host_made += 1  # (as_tensor(tensor) returns that tensor, where it is)
                self._mark(out, True)
            return out
        if func in MOVES:
            target = True if func is torch.Tensor.cpu else False if func is torch.Tensor.cuda else None
            target = self._target_is_host(args[1:], kwargs) if target is None else target
            if target is None:  # a dtype change: the tensor stays where it is
                target = self.on_host(args[0])
            elif out is args[0] and target != self.on_host(args[0]):
                out = out.clone()  # on a GPU run this is a copy to the other side
            self._mark(out, target)
            return out
        inputs = _tensors(args) + _tensors(kwargs)
        host = [t for t in inputs if self.on_host(t)]
        gpu = [t for t in inputs if not self.on_host(t)]
        if func is torch.Tensor.numpy and gpu:
            self._record(func)  # CUDA: "can't convert cuda tensor to numpy", .cpu() first
        if host and gpu:
            allowed = all(t.dim() == 0 for t in host)  # CUDA takes 0-dim CPU tensors as numbers
            if func in INDEXING and not self.on_host(args[0]):
                value = args[2] if len(args) > 2 else None
                allowed = allowed or not (isinstance(value, torch.Tensor) and self.on_host(value) and value.dim() > 0)
            if not allowed:
                self._record(func)
        self._mark(out, bool(inputs) and not gpu)
        if gpu:
            self._count_gpu_bytes(out, inputs)
        return out

    def _record(self, func) -> None:
        self.mixed.append((_name(func), _caller()))

    def _count_gpu_bytes(self, out, inputs: list[torch.Tensor]) -> None:
        """Add the memory that an op's new GPU outputs take (a view or an in-place result takes none)."""
        seen = {_storage(t) for t in inputs}
        for t in _tensors(out):
            if not self.on_host(t) and _storage(t) not in seen:
                seen.add(_storage(t))
                self.gpu_bytes_made += t.untyped_storage().nbytes()
