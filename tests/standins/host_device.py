"""A device type whose tensors live in host memory: the ground the NPU stand-in stands on (tests only).

``install("npu")`` renames PyTorch's PrivateUse1 backend to ``npu`` (what ``import torch_npu`` does on a real
machine); from then on tensors of that device type exist in this CPU-only process:

* ``torch.device("npu:0")`` parses, ``tensor.device.type == "npu"``, and the dispatcher sends ops on those tensors
  to the PrivateUse1 dispatch key, so ``torch.library.register_kernel(op, "npu", fn)`` is what runs for them,
  exactly as with a real backend (torch_npu is a PrivateUse1 backend too).  Fake tensors (Dynamo, AOTAutograd)
  keep the device.
* Their memory is host memory: a device tensor is made from a CPU tensor by re-tagging its DLPack capsule with
  the device's DLPack type (``torch.from_dlpack`` maps ``kDLExtDev`` to PrivateUse1); the capsule's deleter keeps
  the CPU owner alive, so storages are reference-counted as usual.
* Every aten op on them that has no generic kernel reaches one Python fallback for the key.  View and metadata
  ops (``view``, ``as_strided``, ``set_`` ...) run the CPU kernel on the device tensors themselves (those kernels
  only edit sizes, strides and storage, so views share storage for real).  Every other op runs on CPU aliases of its
  device arguments (DLPack again, no copy) and its new outputs are re-tagged to the device; an output that is an
  input (in-place and ``out=`` ops) is returned as that input.  Factory ops get ``device=cpu`` and are re-tagged.
* Device indices are kept (DLPack's ``device_id``): a new output is on the index of the op's ``device`` argument,
  else of its first device tensor, so ``npu:1`` tensors stay ``npu:1`` (a tensor-parallel rank's device).

Limits, stated so nobody mistakes this for the hardware: every op runs synchronously on the CPU (events and
streams are trivially complete), there is no pinned host memory (torch's Python PrivateUse1 hooks have no pinned
allocator) and no device generator, memory statistics are whatever the stand-ins report, and numerical results are
the CPU kernels'.  What it does prove is our side: which device our code allocates on, which kernels the
dispatcher picks for our ops on that device, and that tracing and compiling see the device.

Why not the same for MPS: PyTorch's Python bindings take a device guard for a tensor's device (indexing, ``.to``,
``copy_``, ``item``), a CPU-only build has none for MPS, and only PrivateUse1 accepts one registered from Python.
So the MPS stand-in (``mps.py``) keeps the MPS platform's tensors on the CPU.
"""
import ctypes

import torch

_DLPACK_CODE = {"npu": 12}  # kDLExtDev, which torch.from_dlpack maps to PrivateUse1
_DISPATCH_KEY = {"npu": "PrivateUse1"}
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
# Ops whose CPU kernel only edits tensor metadata (sizes, strides, offset, storage): run as they are on device
# tensors, so views keep sharing storage.
_METADATA_OPS = {"aten::as_strided", "aten::view", "aten::_reshape_alias", "aten::_unsafe_view", "aten::set_",
                 "aten::unfold", "aten::view_as_real", "aten::view_as_complex"}
_installed: dict[str, torch.library.Library] = {}

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _retag(t: torch.Tensor, code: int, index: int = 0) -> torch.Tensor:
    """``t``'s memory as a tensor of device ``index`` of the device with DLPack type ``code`` (1: CPU); no copy."""
    capsule = torch.utils.dlpack.to_dlpack(t)
    # DLManagedTensor starts with DLTensor {void* data; DLDevice {int32 device_type; int32 device_id}; ...}
    device = ctypes.cast(_capsule_pointer(capsule, b"dltensor") + 8, ctypes.POINTER(ctypes.c_int32))
    device[0], device[1] = code, index
    return torch.utils.dlpack.from_dlpack(capsule)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor aliasing device tensor ``t`` (the stand-ins compute on it)."""
    return _retag(t, 1)


def to_device(t: torch.Tensor, device_type: str, index: int = 0) -> torch.Tensor:
    """A tensor of device ``index`` of ``device_type`` aliasing CPU tensor ``t``."""
    return _retag(t.contiguous() if t.numel() == 0 else t, _DLPACK_CODE[device_type], index)


def _resize(t: torch.Tensor, size, device_type: str) -> None:
    size = list(size)
    numel = 1
    for d in size:
        numel *= d
    if t.untyped_storage().nbytes() >= (numel + t.storage_offset()) * t.element_size():
        torch.ops.aten.resize_.default.redispatch(_CPU, t, size)
        return
    fresh = to_device(torch.empty(size, dtype=t.dtype, device="cpu"), device_type, t.device.index or 0)
    torch.ops.aten.set_.source_Storage_storage_offset.redispatch(_CPU, t, fresh.untyped_storage(), 0, size,
                                                                  fresh.stride())


def _index_of(device, args, device_type: str) -> int:
    """The device index of an op's new outputs: its ``device`` argument's, else its first device tensor's."""
    if isinstance(device, torch.device) and device.index is not None:
        return device.index
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(t, torch.Tensor) and t.device.type == device_type:
                return t.device.index or 0
    return 0


def _make_fallback(device_type: str):
    def host(x):
        if isinstance(x, torch.Tensor) and x.device.type == device_type:
            return to_host(x)
        if isinstance(x, torch.device) and x.type == device_type:
            return torch.device("cpu")
        if isinstance(x, (list, tuple)):
            return type(x)(host(y) for y in x)
        return x

    def fallback(op, *args, **kwargs):
        name = op.name()
        if name in _METADATA_OPS:
            return op.redispatch(_CPU, *args, **kwargs)
        if name == "aten::resize_":
            _resize(args[0], args[1], device_type)
            return args[0]
        host_args = [host(a) for a in args]
        host_kwargs = {k: host(v) for k, v in kwargs.items()}
        for i, arg in enumerate(op._schema.arguments[:len(host_args)]):
            # A Python number where the schema has a Tensor is a "wrapped number" the boxed call unwrapped
            if isinstance(host_args[i], (int, float, bool)) and isinstance(arg.type, torch._C.TensorType):
                host_args[i] = torch.tensor(host_args[i], device="cpu")
        if name in ("aten::_copy_from", "aten::_copy_from_and_resize"):  # copy_ between the host and the device
            src, dst = host_args[0], host_args[1]
            if name == "aten::_copy_from_and_resize" and dst.shape != src.shape:
                _resize(args[1], src.shape, device_type)
                dst = to_host(args[1])
            dst.copy_(src, **host_kwargs)
            return args[1]
        if isinstance(kwargs.get("out"), torch.Tensor) and kwargs["out"].device.type == device_type:
            out = kwargs["out"]
            host_kwargs["out"] = torch.empty(0, dtype=out.dtype, device="cpu")  # (a torch.device mode may be on)
            op(*host_args, **host_kwargs)
            _resize(out, host_kwargs["out"].shape, device_type)
            to_host(out).copy_(host_kwargs["out"])
            return out
        result = op(*host_args, **host_kwargs)
        device = kwargs.get("device")
        if isinstance(device, torch.device) and device.type != device_type:
            return result  # an explicit copy off the device
        index = _index_of(device, args, device_type)
        pairs = [(h, a) for h, a in zip(host_args + list(host_kwargs.values()), list(args) + list(kwargs.values()))
                 if isinstance(a, torch.Tensor)]

        def back(o):
            if isinstance(o, torch.Tensor):
                for h, a in pairs:
                    if o is h:  # an in-place op returns its input
                        return a
                return to_device(o, device_type, index)
            if isinstance(o, (list, tuple)):
                return type(o)(back(y) for y in o)
            return o
        return back(result)
    return fallback


def install(device_type: str = "npu") -> None:
    """Make ``device_type`` a host-memory device of this process (idempotent; permanent, since the backend rename
    and the fallback cannot be undone, but inert until a tensor of that device is made)."""
    if device_type in _installed:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend
    _setup_privateuseone_for_python_backend(device_type)
    lib = torch.library.Library("_", "IMPL")
    lib.fallback(_make_fallback(device_type), _DISPATCH_KEY[device_type])
    _installed[device_type] = lib
