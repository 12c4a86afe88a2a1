"""How far a model's logits move when its attention outputs are perturbed by 1e-6 (relative), in the simulator,
per linear scheme: the reason the dynamic int8-input schemes are held to a looser whole-model tolerance between
backends than the int4 ones (docs/numerics.md, "Tolerances between backends"). The tiny random test model of
tests/conftest.py (hidden 256, FFN 704).

    python bench/int8_sensitivity.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_tiny_hf  # noqa: E402

from mergequant.convert import convert  # noqa: E402
from mergequant.convert.quant import simulate  # noqa: E402
from mergequant.convert.quant.simulate import SimModel  # noqa: E402


def main() -> None:
    d = Path(tempfile.mkdtemp())
    ck = write_tiny_hf(d / "ck", "f32", False, tie_word_embeddings=True, hidden_size=256, intermediate_size=704,
                       max_position_embeddings=1024)
    attend = simulate.attend
    rng = np.random.default_rng(0)

    def noisy(*a, **k):
        o = attend(*a, **k)
        return (o * (1 + 1e-6 * rng.standard_normal(o.shape))).astype(np.float32)

    print("| scheme | tokens | max-abs logit change / max-abs logit |\n|---|---|---|")
    for scheme in ("w8a8", "w4a4d", "f16"):
        sim = SimModel.from_mq(convert(ck.path, d / f"{scheme}.mq", scheme=scheme, progress=False))
        r = np.random.default_rng(1)
        for n in (1, 9, 300):
            ids = np.array(r.integers(0, 256, n))
            simulate.attend = attend
            a = sim.forward(ids)[-1]
            simulate.attend = noisy
            b = sim.forward(ids)[-1]
            simulate.attend = attend
            print(f"| {scheme} | {n} | {float(np.max(np.abs(a - b)) / np.max(np.abs(a))):.2e} |")


if __name__ == "__main__":
    main()
