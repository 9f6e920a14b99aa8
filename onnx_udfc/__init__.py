"""onnx-udfc: data-free structured pruning and weight quantization of ONNX CNNs with closed-form
compensation from BatchNorm statistics."""

__version__ = "0.1.0"

from .api import compress  # noqa: E402
from .config import Options  # noqa: E402
from .errors import BadModelError, PassError, UdfcError, UsageError, ValidationFailed  # noqa: E402
from .ir.io import load_model, save_model  # noqa: E402
from .report.report import Report  # noqa: E402

__all__ = ["compress", "Options", "Report", "load_model", "save_model", "UdfcError", "UsageError",
           "BadModelError", "PassError", "ValidationFailed", "__version__"]
