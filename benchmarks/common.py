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


def machine_settings() -> dict:
    """CPU count and load average at the time of writing (timings on a busy machine are noisy)."""
    import os

    return dict(cpus=os.cpu_count(), load_average=[round(x, 2) for x in os.getloadavg()])


def write_json_and_table(out_dir: str, tag: str, settings: dict, rows: list, preamble: str, header: str,
                         format_row, footer: str = "") -> None:
    """`<tag>.json` ({"settings", "rows"}) and `<tag>.md` (preamble, the markdown table of `rows`, footer)."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, tag + ".json"), "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, tag + ".md"), "w") as f:
        f.write(preamble + "\n\n")
        f.write(header + "\n|" + "---|" * (header.count("|") - 1) + "\n")
        for r in rows:
            f.write(format_row(r) + "\n")
        f.write(footer)
