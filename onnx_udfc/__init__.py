"""onnx-udfc: data-free structured pruning and weight quantization of ONNX CNNs with closed-form
compensation from BatchNorm statistics.

The public names are loaded on first use, so `import onnx_udfc` (and the CLI's start-up) stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["compress", "Options", "Report", "load_model", "save_model", "UdfcError", "UsageError",
           "BadModelError", "PassError", "ValidationFailed", "__version__"]

_LAZY = {
    "compress": ".api", "Options": ".config", "Report": ".report.report", "load_model": ".ir.io",
    "save_model": ".ir.io", "UdfcError": ".errors", "UsageError": ".errors", "BadModelError": ".errors",
    "PassError": ".errors", "ValidationFailed": ".errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnx_udfc' has no attribute {name!r}")
