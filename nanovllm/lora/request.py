"""``LoRARequest``: vLLM's class naming one LoRA adapter for a request.

``LoRARequest(lora_name, lora_int_id, lora_path="")``: ``lora_int_id`` is the adapter's identity (an int >= 1,
else ``ValueError``; 0 is the kernel's "no adapter" slot), ``lora_path`` a PEFT adapter directory, read only when
the adapter is first loaded. As in vLLM, ``name``, ``adapter_id`` and ``path`` alias the fields, and two requests
are equal (and hash alike) when their names are.
"""
import os
from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty str, got {self.lora_name!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)):
            raise ValueError(f"lora_path must be a directory path, got {self.lora_path!r}")
        self.lora_path = os.fspath(self.lora_path)

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other) -> bool:
        return isinstance(other, self.__class__) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
