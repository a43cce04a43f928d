"""Raw images -> region records: decoding, the Visual Genome Faster R-CNN, box selection, runner, feature store."""

import logging
import warnings

# Detectron2 0.7 calls ``torch.jit.script`` when imported and ``torch.meshgrid`` without ``indexing=`` in its
# anchor generator. Both warnings are about torch's future, say nothing a user can act on, and break the
# progress bar of every run: silenced by message and by the torch module that issues them, nothing else.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", module=r"torch\.jit")
warnings.filterwarnings(
    "ignore", message=r"torch\.meshgrid: in an upcoming release", module=r"torch\.functional"
)


class _DropFxTracingNotice(logging.Filter):
    """Drops torch.fx's "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"
    notice, logged (not warned) by ``torch.fx._symbolic_trace`` the first time Detectron2's ROIPooler asks
    ``is_fx_tracing()``; every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("is_fx_tracing will return true")


# The same kind of notice, issued through logging by the module named here: filtered by message there only.
logging.getLogger("torch.fx._symbolic_trace").addFilter(_DropFxTracingNotice())
