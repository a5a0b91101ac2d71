"""A guard, for CPU test runs, against anything a GPU step would wait for.

On a GPU the host queues kernels ahead of the device; each of these makes it stop
and wait for the queue to drain (and most also rule out CUDA graphs):

- a data-dependent shape: ``nonzero``, boolean-mask indexing, ``masked_select``,
  ``unique``, ``repeat_interleave`` by a tensor of counts (the output size is on
  the device);
- a scalar read: ``item``, ``tolist``, ``bool(t)``, ``float(t)``, ``numpy``
  (``aten._local_scalar_dense`` underneath);
- a copy from the device to the host: ``.cpu()``, ``.to("cpu")`` of a device tensor.

``torch.cuda.set_sync_debug_mode("error")`` sees these only on a GPU. ``NoHostSync``
sees them on the CPU, where the tensors hold real values (so every branch the values
choose is taken): a dispatch mode refuses the ops (forward and backward), a function
mode refuses the Python-level reads that never reach the dispatcher on the CPU
(``tolist``, ``.cpu()`` and ``numpy`` of a CPU tensor). On the meta device a copy to
the host is a real ``_to_copy``, refused as well.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

DATA_DEPENDENT_SHAPES = {
    aten.nonzero.default, aten.nonzero.out, aten.argwhere.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default, aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
}
SCALAR_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default}

# Tensor methods that read values on the host without reaching the dispatcher on the CPU
HOST_READS = {
    torch.Tensor.tolist: "a scalar read (tolist)",
    torch.Tensor.item: "a scalar read (item)",
    torch.Tensor.numpy: "a device-to-host copy (numpy)",
    torch.Tensor.cpu: "a device-to-host copy (.cpu())",
    torch.Tensor.__bool__: "a scalar read (bool(tensor))",
    torch.Tensor.__int__: "a scalar read (int(tensor))",
    torch.Tensor.__float__: "a scalar read (float(tensor))",
    torch.Tensor.__index__: "a scalar read (tensor as an index)",
}


class HostSyncError(RuntimeError):
    """Something in the guarded block would make the host wait for the GPU."""


def _where() -> str:
    """The innermost frame of cofi's code (else of the caller) that led here."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename and "host_sync" not in f.filename]
    ours = [f for f in frames if "/cofi/" in f.filename] or frames
    f = ours[-1]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name}: {f.line})"


def _refuse(what: str) -> None:
    raise HostSyncError(f"{what} at {_where()}: a GPU would wait for the host here")


def _read_on_device(t: object, device: str) -> bool:
    """Whether reading ``t`` would wait for the device: on a CPU run every tensor stands
    for a device tensor; on meta a CPU tensor is the host's own (an optimiser's step count)."""
    return isinstance(t, torch.Tensor) and (device == "cpu" or t.device.type != "cpu")


class _RefuseOps(TorchDispatchMode):
    def __init__(self, device: str):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT_SHAPES:
            _refuse(f"a data-dependent shape ({func})")
        if func in SCALAR_READS and any(_read_on_device(a, self.device) for a in args):
            _refuse(f"a scalar read ({func})")
        if func in INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                _refuse(f"boolean-mask indexing ({func})")
        if func in COPIES:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            target = kwargs.get("device")
            source = {t.device.type for t in tensors}
            to_host = (target is not None and torch.device(target).type == "cpu") or (
                func is not aten._to_copy.default and tensors and tensors[0].device.type == "cpu")
            if to_host and source - {"cpu"}:
                _refuse(f"a device-to-host copy ({func} from {sorted(source - {'cpu'})})")
        return func(*args, **kwargs)


class _RefuseHostReads(TorchFunctionMode):
    def __init__(self, device: str):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and _read_on_device(args[0], self.device):
            _refuse(HOST_READS[func])
        if func is torch.Tensor.to:
            target = [a for a in (*args[1:], *(kwargs or {}).values()) if isinstance(a, (str, torch.device))]
            if target and torch.device(target[0]).type == "cpu" and args[0].device.type != "cpu":
                _refuse("a device-to-host copy (.to('cpu'))")
        return func(*args, **(kwargs or {}))


class NoHostSync:
    """``with NoHostSync(device): ...`` raises ``HostSyncError`` on the first thing in the
    block a GPU would wait for, naming it and the line of cofi that did it. ``device``:
    where the guarded code's tensors live, "cpu" (each stands for a GPU tensor) or "meta"."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def __enter__(self) -> "NoHostSync":
        self._modes = [_RefuseHostReads(self.device), _RefuseOps(self.device)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
