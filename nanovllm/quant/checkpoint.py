"""A safetensors checkpoint's tensors, their headers read once: which file holds each tensor, its stored dtype,
and the tensor (or a slice of it) read on demand.  The loader and every scheme read through one ``Checkpoint``;
a context manager that keeps its files open until exit.  A truncated or corrupt file is a ValueError naming it.
"""
from contextlib import ExitStack

import torch
from safetensors import SafetensorError, safe_open


def corrupt(path: str, error: Exception) -> ValueError:
    return ValueError(f"safetensors file {path!r} is truncated or corrupt ({error}); copy or download it again")


class Checkpoint:
    """The tensors of the safetensors ``files``, by name (a name in two files: the later file's)."""

    def __init__(self, files: list[str]):
        self.files = list(files)
        self._stack = ExitStack()
        self.handles: dict[str, object] = {}
        self.file_of: dict[str, str] = {}
        self._names: dict[str, list[str]] = {}  # file -> its tensor names, from the one scan
        for path in self.files:
            try:
                f = self._stack.enter_context(safe_open(path, framework="pt"))
                names = list(f.keys())
            except SafetensorError as e:
                self._stack.close()
                raise corrupt(path, e) from e
            self.handles[path] = f
            self._names[path] = names
            self.file_of.update((name, path) for name in names)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self, path: str | None = None) -> list[str]:
        """Every tensor name (of one file: ``path``)."""
        return list(self.file_of) if path is None else list(self._names[path])

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def handle(self, name: str):
        """The open safetensors file that holds ``name``."""
        return self.handles[self.file_of[name]]

    def stored_dtype(self, name: str) -> str:
        """safetensors' dtype name of ``name`` (e.g. "BF16", "F8_E4M3")."""
        return self.handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor | None:
        """The whole tensor ``name``, or None where the checkpoint has none."""
        return self.handle(name).get_tensor(name) if name in self.file_of else None

    def slice(self, name: str):
        """safetensors' lazy slice of ``name`` (``get_shape``, ``get_dtype``, indexing reads only that piece)."""
        return self.handle(name).get_slice(name)


def clamp(cut: tuple[int, int, int] | None, shape) -> tuple[int, int, int] | None:
    """A rank's ``(dim, start, length)`` cut as ``(dim, start, stop)`` with stop inside a stored ``shape``."""
    if cut is None:
        return None
    dim, start, length = cut
    return dim, start, max(start, min(start + length, shape[dim]))


def pad(piece: torch.Tensor, cut: tuple[int, int, int] | None) -> torch.Tensor:
    """``piece`` grown with zeros to its cut's length (rows past a tensor's end: the LM head's vocabulary
    padding)."""
    if cut is None or piece.shape[cut[0]] >= cut[2]:
        return piece
    dim, _, length = cut
    shape = list(piece.shape)
    shape[dim] = length - piece.shape[dim]
    return torch.cat([piece, piece.new_zeros(shape)], dim)


def read_piece(stored, cut: tuple[int, int, int] | None) -> torch.Tensor:
    """This rank's piece of a stored tensor (a safetensors slice: only that piece is read), ``cut`` as
    ``models/tensor_parallel.checkpoint_slice`` gives it (None: all of it), padded as ``pad`` says."""
    if cut is None:
        return stored[:]
    dim, start, stop = clamp(cut, stored.get_shape())
    return pad(stored[(slice(None),) * dim + (slice(start, stop),)], cut)
