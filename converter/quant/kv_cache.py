"""Static per-channel steps of the int8 KV cache (docs/numerics.md, "int8 KV cache"). The finished model
runs in the simulated engine (fp16 cache) on calibration text; the step of channel c of a layer's k or v
cache is s_c = absmax_c / 127 over what the engine stores there: k after RoPE and v as fp32, before the
cache's rounding (for `w4a4` blocks v is already in units of the o_proj input step)."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from tqdm import tqdm

from .calibrate import CALIBRATION_ARGS, CalibrationSpec, calibration_spec
from .simulate import KV_QMAX, SimModel, kv_scale_names

# the KV calibration's defaults where no calibration option is given: 8 sequences of 512 tokens
KV_CALIB_N, KV_CALIB_LEN = 8, 512


def kv_calibration_args(method: Callable[..., Any] | None, args: Mapping[str, Any]
                        ) -> tuple[CalibrationSpec, dict[str, Any]]:
    """The KV calibration's spec from the calibration options among a conversion's method arguments
    (defaults 8 x 512), and the arguments left for the method: all of them when it takes calibration
    options itself (both then calibrate on the options given), the others otherwise."""
    calib = {k: v for k, v in args.items() if k in CALIBRATION_ARGS}
    takes = method is not None and any(k in inspect.signature(method).parameters for k in CALIBRATION_ARGS)
    rest = dict(args) if takes else {k: v for k, v in args.items() if k not in calib}
    return calibration_spec(calib, n=KV_CALIB_N, length=KV_CALIB_LEN), rest


def kv_absmax(sim: SimModel, ids: np.ndarray, progress: bool = False) -> np.ndarray:
    """[L, 2, Hkv·hd] float32: per layer, the absmax of every channel of k after RoPE (row 0) and of v
    (row 1) over the token windows ids [n, T], each a fresh sequence, as `sim` stores them."""
    cfg = sim.config
    amax = np.zeros((cfg.num_hidden_layers, 2, cfg.num_key_value_heads * cfg.head_dim), np.float32)

    def observe(layer: int, k: np.ndarray, v: np.ndarray) -> None:
        for j, x in enumerate((k, v)):
            np.maximum(amax[layer, j], np.abs(x).reshape(-1, amax.shape[2]).max(axis=0), out=amax[layer, j])

    for row in tqdm(np.asarray(ids, np.int64), desc="kv-cache scales", unit="seq", disable=not progress):
        sim.hidden(row[None], kv_observer=observe)
    return amax


def kv_steps(amax: np.ndarray) -> np.ndarray:
    """s = absmax / 127 in fp32; a channel that never left 0 gets s = 1 (any positive step stores 0)."""
    amax = np.asarray(amax, np.float32)
    return np.where(amax > 0, amax / np.float32(KV_QMAX), np.float32(1)).astype(np.float32)


def kv_scale_tensors(sim: SimModel, ids: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
    """The file tensors `blk.{i}.attn_k_scale`, `blk.{i}.attn_v_scale` (F32 [Hkv·hd]) calibrated on ids."""
    steps = kv_steps(kv_absmax(sim, ids, progress))
    out: dict[str, np.ndarray] = {}
    for i, (k, v) in enumerate(steps):
        k_name, v_name = kv_scale_names(i)
        out[k_name], out[v_name] = k, v
    return out
