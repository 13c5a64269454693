"""Counts, on CPU, the calls that would make the host wait for a GPU.

On CUDA the host blocks on a device-to-host read (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``bool()`` / ``float()`` / ``int()`` of a tensor), on an op whose output size depends on the data
(``nonzero`` and friends), and on a blocking host-to-device copy (``torch.tensor(data, device=...)``). On CPU
none of these wait, so they are counted as calls: at the Python API (a TorchFunctionMode) for what is
spelt out in code, and at the dispatcher (a TorchDispatchMode: ``aten._local_scalar_dense``, ``aten.nonzero``)
for what happens implicitly inside torch functions. Each call is attributed to the innermost frame of the
code under test (``lfqa/`` or ``transformers/``) that made it.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
          torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}
_DATA_DEPENDENT = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
                   torch.unique, torch.Tensor.unique, torch.argwhere, torch.where}
_FACTORIES = {torch.tensor, torch.as_tensor}
_DISPATCH = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
             "aten::unique_dim"}


def caller() -> str:
    """``package/module.py:function`` of the innermost lfqa or transformers frame on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        for package in ("/lfqa/", "/transformers/"):
            if package in name and "sync_counter" not in name:
                module = name.split(package, 1)[1]
                return f"{package.strip('/')}/{module}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "other"


class _Functions(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in _READS or func in _DATA_DEPENDENT:
            if not (func is torch.where and len(args) + len(kwargs) > 1):  # where(cond, a, b) is elementwise
                name = getattr(func, "__name__", str(func))
        elif func in _FACTORIES and kwargs.get("device") is not None and not isinstance(args[0], torch.Tensor):
            name = f"{func.__name__}(..., device=)"
        if name is None or self.counter.inside:
            return func(*args, **kwargs)
        self.counter.counts[(caller(), name)] += 1
        self.counter.inside = True  # what this call dispatches is the same wait: not counted again
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.inside = False


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _DISPATCH and not self.counter.inside:
            self.counter.counts[(caller(), name)] += 1
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """``with SyncCounter() as sync: ...``; then ``sync.counts``: {(caller, call): n}."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.inside = False
        self._modes = ()

    def __enter__(self) -> SyncCounter:
        self._modes = (_Functions(self), _Dispatch(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def total(self, prefix: str = "") -> int:
        return sum(n for (where, _), n in self.counts.items() if where.startswith(prefix))
