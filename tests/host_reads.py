"""Counting the reads of tensor values back to the host (on an accelerator, each one waits for the device) on a CPU,
where torch's own sync debug mode does not exist."""

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# Operators that read a tensor's values on the host: `.item()`, `float()`, `int()` and `bool()` of a tensor all end in
# `_local_scalar_dense`; `nonzero` and `masked_select` size their output from the data; `torch.multinomial` checks its
# input with `.item()` inside its kernel; `torch.isin` may sort and `unique` (which sizes its output from the data).
READING_OPERATORS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.multinomial.default",
    "aten.isin.Tensor_Tensor",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
}


def _boolean_index(args) -> bool:
    """Whether an `index`/`index_put` call selects with a boolean mask (a `nonzero` inside)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostReads(TorchDispatchMode):
    """A dispatch mode that counts the host reads of every operator run inside it (`counts`, by operator), while
    `counting` is on; `Tensor.tolist` (which reads without an operator) is counted too. Use as a context manager."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.counting and (
            name in READING_OPERATORS or (name.startswith(("aten.index.", "aten.index_put")) and _boolean_index(args))
        ):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @contextlib.contextmanager
    def tolist_counted(self):
        original = torch.Tensor.tolist

        def tolist(tensor):
            if self.counting:
                self.counts["Tensor.tolist"] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist
        try:
            yield self
        finally:
            torch.Tensor.tolist = original
