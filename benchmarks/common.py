"""Helpers shared by the accuracy benchmarks: output agreement metrics and `--option KEY=VALUE` parsing."""
import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (n, classes)."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(softmax(p) || softmax(q)) over the rows."""
    p, q = softmax(p_logits.astype(np.float64)), softmax(q_logits.astype(np.float64))
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def option_value(text: str):
    """`--option` value: int, float, true/false/none, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)
