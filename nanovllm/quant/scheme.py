"""The interface every weight-quantization scheme implements (``QuantScheme``); the schemes are in
``fp8_schemes.py`` and ``int4_schemes.py``, the registry from a name to a scheme in ``registry.py``.

A scheme is built from its ``quantization_config`` (a checkpoint's; ``{}`` for one chosen by ``quantization=``)
and validates every field there, raising a ValueError that names the field and its value, so that ``EngineConfig``
refuses a bad config before any weight loads or process starts.  Then, per model:

* a checkpoint's scheme reads its weights: ``load`` makes the parameters it holds quantized (``prepare``) and fills
  this rank's piece of each from the checkpoint's tensors that it ``owns`` (the loader reads the rest);
* ``quantize_online`` quantizes a loaded model's weights in place (``quantization="fp8"``, or dummy weights of a
  quantized config: ``for_dummy_weights`` names that scheme);
* ``describe`` is the start-up line's text; ``write_checkpoint`` rewrites a checkpoint in the scheme's layout and
  ``write_oracle`` writes it dequantized, for transformers (``tools/synthesize.py``, ``tools/oracle.py``).

A held weight's memory format and its ops are the format's (``kernels/weight_quant.py``, ``kernels/int4_quant.py``).
"""


class QuantScheme:
    """A quantization scheme; subclasses set ``method`` (the registry's key) and override what they support."""
    method = ""
    takes_quantization: tuple[str, ...] = ()  # ``quantization=`` values allowed on such a checkpoint (read as stored)
    quantize_from_host = False  # dummy weights too large in 16 bits: drawn on the host, quantized on the device
    draws_held = False  # dummy experts drawn straight into the held format (``draw_held``), built on meta first

    def __init__(self, quant: dict | None = None):
        self.quant = dict(quant or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method!r})"

    def owns(self, name: str, checkpoint) -> bool:
        """Whether checkpoint tensor ``name`` is this scheme's to read (its weights, scales, zeros, act orders)."""
        return False

    def load(self, model, checkpoint, placement, filled: dict[str, set]) -> None:
        """Read the tensors this scheme ``owns`` into ``model`` (``checkpoint``: ``quant.checkpoint.Checkpoint``;
        ``placement``: ``models/placement.Placement``), recording each parameter part placed in ``filled``."""

    def for_dummy_weights(self) -> "QuantScheme":
        """The scheme that quantizes dummy weights of this scheme's config (``load_format="dummy"``)."""
        return self

    def draw_held(self, name: str, module, attr: str, draw, device) -> None:
        """With ``draws_held``: make ``module``'s meta parameter ``attr`` (``name``) held, on ``device``, from
        random values ``draw(shape)`` gives a piece at a time."""
        raise NotImplementedError(f"{self.method} does not draw held dummy weights")

    def quantize_online(self, model, device=None) -> None:
        """Quantize the loaded ``model``'s weights in place (``device``: where to compute, else where each is)."""
        raise ValueError(f"quantization {self.method!r} cannot quantize loaded weights")

    def describe(self, model) -> str | None:
        """The start-up line's text for ``model`` under this scheme (None: nothing stayed quantized)."""
        return None

    def write_checkpoint(self, model_dir, skip: list[str] | None = None, **options) -> None:
        """Rewrite the safetensors checkpoint in ``model_dir`` in this scheme's layout (``skip``: modules left as
        they are)."""
        raise ValueError(f"quantization {self.method!r} writes no checkpoint")

    def write_oracle(self, src, dst, dtype=None) -> str:
        """Write ``src`` with its weights dequantized (the oracle's checkpoint) to ``dst``; its path."""
        raise ValueError(f"quantization {self.method!r} has no dequantized oracle")


def refuse(method: str, field: str, value, allowed: str):
    """The ValueError of a ``quantization_config`` field this engine does not take."""
    raise ValueError(f"quantization_config.{field}={value!r} is not supported for quant_method={method!r} "
                     f"(supported: {allowed})")
