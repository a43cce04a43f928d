"""Raw images -> region records: decoding, the Visual Genome Faster R-CNN, box selection, runner, feature store."""

import warnings

# Detectron2 0.7 calls ``torch.jit.script`` when imported and ``torch.meshgrid`` without ``indexing=`` in its
# anchor generator. Both warnings are about torch's future, say nothing a user can act on, and break the
# progress bar of every run: silenced by message and by the torch module that issues them, nothing else.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", module=r"torch\.jit")
warnings.filterwarnings(
    "ignore", message=r"torch\.meshgrid: in an upcoming release", module=r"torch\.functional"
)
