"""Is converting a 7B model practical? Writes a random-weight Hugging Face checkpoint of the Llama-2-7B shape
(hidden 4096, intermediate 11008, 32 heads and 32 kv heads, vocab 32000) with N whole decoder layers, converts it
to .mq in a child process under measurement, and reports wall time (per stage and per layer), peak RSS, and the
memory bound the converter is meant to keep:

    peak RSS < 2 x (one layer's fp32 weights) + (the calibration activations of one layer)

    python3 bench/convert_7b.py --layers 2 --method mergequant --calib-n 8 --calib-len 512 --md OUT.md
    python3 bench/convert_7b.py --layers 2 --method none --scheme w4a16g      # no calibration: the floor

The checkpoint: config.json (LlamaForCausalLM, Llama-2-7B's numbers except num_hidden_layers = N), weights
those of bench/peer/random_weights.py (uniform, standard deviation 0.02, the same values as bench_gpu.py's files;
the calibration forward stays finite), norms ones, stored in fp16 (or --dtype bf16) as one
safetensors shard per decoder layer plus one for the embedding / final norm / lm_head, with
model.safetensors.index.json (as Llama-2-7b-hf ships, sharded; the writer holds one layer), and the Llama-2
SentencePiece tokenizer from $MERGEQUANT_SHARED/data/tokenizers/llama2 (tokenizer.model, tokenizer_config.json,
special_tokens_map.json; reading it needs the `sentencepiece` package, a mergequant dependency). Calibration
text is the built-in wikitext2+c4 set under $MERGEQUANT_SHARED/data/eval, tokenized with that tokenizer.

Measurement: the conversion runs in a child process (`--_child`, not for direct use) so its memory is its own:
peak RSS is the child's VmHWM read by itself when the conversion is done (the kernel's high-water mark of its
resident set: anonymous memory plus the resident pages of the memory-mapped checkpoint; wait4's ru_maxrss is
printed beside it, but on Linux it also counts the image forked from this parent before exec), and a sampler thread in the child reads /proc/self/status
every 20 ms for the peak per stage and the anonymous / file-backed split (sampled, so a spike shorter than 20 ms
can be missed there; the overall peak is exact). Per-layer time is the time between the method yielding layer i
and layer i + 1 (it includes writing the layer's packed tensors). "Extrapolated to 32 layers" is the measured
time outside the layers plus 32 x the mean measured layer time: stated as extrapolated, never measured unless
--layers 32. The conversion's peak does not grow with the layer count (one layer is held at a time; the packed
layers go to a scratch file on disk), which --layers 1 vs 2 shows.

The bound, from the shape and the calibration size M = calib_n x calib_len tokens (both printed):
- one layer's fp32 weights: q, k, v, o (4 x 4096^2) + gate, up, down (3 x 4096 x 11008) + two norms, x 4 bytes
  (202.4M parameters, 809.6 MB);
- calibration activations: the fp32 tensors of one block's forward on the M tokens, as the sequential calibration
  holds them: the residual stream in and after attention, the two norm outputs (4 x [M, 4096]), q/k/v
  [M, 3 x 4096], the attention output [M, 4096], gate/up [M, 2 x 11008], the SwiGLU output [M, 11008] and
  ffn_down's output [M, 4096]: 69,888 floats per token (280 KB). The script also prints the strict variant the
  issue's wording allows (the residual stream plus the widest intermediate, [M, 4096 + 2 x 11008]).
The bound counts no GPTQ Hessian: ffn_down's is [Kp, Kp] for Kp = 11008 plus the split slots (13,248 with the
default 0.2 budget: 702 MB in fp32), which GPTQ works on in float64 (docs/architecture.md, "Memory of a
conversion"); the peak against the bound is the measurement.

What to expect (bench/RESULTS.md, "Converting a 7B shape"; 2 busy vCPUs, 8 x 512 calibration): --method none
1.4 GB and ~25 s a layer; rtn-w4a4-static 2.5 GB, ~100 s a layer; mergequant 2.5 GB and ~6-10 min a layer
(2026-12-07; 7.6 GB and ~30 min a layer with numpy's inverse of ffn_down's float64 Hessian). The conversion runs on the CPU (numpy / OpenBLAS, all cores
unless OPENBLAS_NUM_THREADS says otherwise); there is no --device.

Runs with numpy, safetensors, gguf, tokenizers, sentencepiece, tqdm and the mergequant package (with its
compiled extension: calibration tokenizes with the engine's tokenizer). Disk: the checkpoint is 0.52 GB plus
0.40 GB per layer (13.5 GB at 32 layers), the .mq about 0.1 GB per layer plus 0.5 GB, and the converter's scratch
as much again while it writes; --workdir (default: a temporary folder under /tmp) is removed afterwards unless
--keep.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

# the Llama-2-7B shape and its random weights as the GPU benchmark draws them (bench/peer/random_weights.py)
sys.path.insert(0, str(Path(__file__).resolve().parent / "peer"))
import random_weights as rw  # noqa: E402
from results_section import cpu_name  # noqa: E402

C = rw.LLAMA2_7B
SHAPE = {"hidden_size": C.hidden_size, "intermediate_size": C.intermediate_size,
         "num_attention_heads": C.num_attention_heads, "num_key_value_heads": C.num_key_value_heads,
         "vocab_size": C.vocab_size}
FULL_LAYERS = C.num_hidden_layers


def hf_config(layers: int, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **SHAPE,
            "num_hidden_layers": layers, "max_position_embeddings": C.max_position_embeddings,
            "rms_norm_eps": C.rms_norm_eps, "rope_theta": C.rope_theta, "rope_scaling": None,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
            "initializer_range": rw.SD, "torch_dtype": "float16" if dtype == "f16" else "bfloat16"}


def layer_fp32_bytes() -> int:
    d, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    return 4 * (4 * d * d + 3 * d * f + 2 * d)


ACT_WIDTH = 4 * SHAPE["hidden_size"] + 3 * SHAPE["hidden_size"] + SHAPE["hidden_size"] + \
    2 * SHAPE["intermediate_size"] + SHAPE["intermediate_size"] + SHAPE["hidden_size"]   # 69,888 floats a token
STRICT_WIDTH = SHAPE["hidden_size"] + 2 * SHAPE["intermediate_size"]


def shared_dir() -> Path:
    """The shared folder (holding data/eval and data/tokenizers), where the converter's calibration finds it."""
    from mergequant.convert.quant.calibrate import shared_data_dir
    try:
        return shared_data_dir().parent
    except FileNotFoundError as e:
        raise SystemExit(f"{e} (this script also reads data/tokenizers/llama2 there)") from None


# ---------------------------------------------------------------- the checkpoint

def _store(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f16":
        return x.astype(np.float16)
    # bfloat16 words, rounded to nearest even, stored as uint16 (safetensors.numpy has no bfloat16)
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _save_shard(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """One safetensors shard; bf16 tensors (uint16 words) are relabelled BF16 in the header."""
    from safetensors.numpy import save_file
    save_file(tensors, str(path), metadata={"format": "pt"})
    if dtype == "bf16":  # rewrite the header's dtype strings (same length: "U16" -> "BF16" is not, so rebuild)
        import struct
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        head = json.loads(data[8:8 + n])
        for k, v in head.items():
            if k != "__metadata__" and v["dtype"] == "U16":
                v["dtype"] = "BF16"
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def write_checkpoint(out: Path, layers: int, dtype: str, tokenizer_dir: Path) -> dict:
    """config.json, one shard per layer + one for the rest, the index, the tokenizer files. Returns timings."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(layers, dtype), indent=1) + "\n")
    for src, dst in (("tokenizer.model", "tokenizer.model"), ("tokenizer_config.llama2-hf.json", "tokenizer_config.json"),
                     ("special_tokens_map.json", "special_tokens_map.json")):
        if not (tokenizer_dir / src).is_file():
            raise SystemExit(f"{tokenizer_dir / src} not found (the Llama-2 tokenizer files)")
        shutil.copyfile(tokenizer_dir / src, out / dst)

    def drawn(name: str) -> np.ndarray:  # rw's fp16 draws (the same values as bench_gpu's files), then stored
        return _store(rw.weight(name, *shapes[name]).astype(np.float32), dtype)

    shapes = {"token_embd": (C.vocab_size, C.hidden_size), "output": (C.vocab_size, C.hidden_size)}
    d = C.hidden_size
    ones = _store(np.ones(d, np.float32), dtype)
    n_shards = layers + 1
    weight_map: dict[str, str] = {}
    for i in range(layers):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        p = f"model.layers.{i}."
        shard = {p + "input_layernorm.weight": ones, p + "post_attention_layernorm.weight": ones}
        for key, short in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                           ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                           ("mlp.down_proj", "down")):
            shard[p + key + ".weight"] = _store(rw.linear(C, i, short).astype(np.float32), dtype)
        _save_shard(out / name, shard, dtype)
        weight_map |= {k: name for k in shard}
        del shard
    name = f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    shard = {"model.embed_tokens.weight": drawn("token_embd"), "model.norm.weight": ones, "lm_head.weight": drawn("output")}
    _save_shard(out / name, shard, dtype)
    weight_map |= {k: name for k in shard}
    del shard
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    return {"write_s": time.perf_counter() - t0, "bytes": total}


# ---------------------------------------------------------------- the child: the conversion under measurement

def _status() -> dict[str, int]:
    """kB fields of /proc/self/status."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


class Sampler(threading.Thread):
    """Peak VmRSS / RssAnon / RssFile per stage, sampled every `period` seconds."""

    def __init__(self, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.period, self.stage, self.t_stage = period, "start", time.perf_counter()
        self.stages: dict[str, dict] = {}
        self.main_id = threading.get_ident()
        self.peak_kb, self.peak_where, self.peak_stage = 0, [], ""
        self.order: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        with self._lock:
            self._sample()
            self._entry(self.stage)["s"] += now - self.t_stage
            self.stage, self.t_stage = stage, now
            self._sample()

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            self.stages[new] = self.stages.pop(old)
            self.order[self.order.index(old)] = new
            if self.stage == old:
                self.stage = new

    def _entry(self, stage: str) -> dict:
        if stage not in self.stages:
            self.stages[stage] = {"s": 0.0, "rss_kb": 0, "anon_kb": 0, "file_kb": 0}
            self.order.append(stage)
        return self.stages[stage]

    def _sample(self) -> None:
        st = _status()
        if st.get("VmRSS", 0) > self.peak_kb:  # where the main thread is at each new peak (its last frames in the
            self.peak_kb = st["VmRSS"]         # converter: a wait on the thread pool names the converter's caller)
            frame = sys._current_frames().get(self.main_id)
            stack = traceback.extract_stack(frame) if frame is not None else []
            own = [f for f in stack if f"{os.sep}mergequant{os.sep}" in f.filename]
            self.peak_where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in (own or stack)[-4:]]
            self.peak_stage = self.stage
        e = self._entry(self.stage)
        e["rss_kb"] = max(e["rss_kb"], st.get("VmRSS", 0))
        e["anon_kb"] = max(e["anon_kb"], st.get("RssAnon", 0))
        e["file_kb"] = max(e["file_kb"], st.get("RssFile", 0))

    def run(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                self._sample()

    def stop(self) -> None:
        self.mark("end")
        self._stop.set()


def child(spec: dict) -> None:
    """Convert spec["src"] to spec["out"] with the given method, timing each stage; write spec["report"]."""
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    sampler.mark("import + load")
    import importlib
    cv = importlib.import_module("mergequant.convert.convert")  # the module (the package exports a function of its name)
    mqfile = importlib.import_module("mergequant.convert.mqfile")

    layer_s: list[float] = []

    def timed(make):
        def wrapper(*args, **kwargs):
            sampler.mark("calibration tokens + method setup")
            gen = iter(make(*args, **kwargs))

            def blocks():
                i, t = 0, time.perf_counter()
                while True:
                    sampler.mark(f"layer {i}")
                    try:
                        block = next(gen)
                    except StopIteration:  # the time after the last layer: the method's own wrap-up, if any
                        sampler.rename(f"layer {i}", "after the layers")
                        break
                    yield block  # the consumer writes the block before asking for the next
                    del block    # (not held here while the next layer is made)
                    now = time.perf_counter()
                    layer_s.append(now - t)
                    t, i = now, i + 1
                sampler.mark("output + embedding")
            return blocks()
        return wrapper

    method = spec["method"]
    kwargs = dict(spec["method_args"])
    if method is None:
        cv.plain_blocks = timed(cv.plain_blocks)
    else:
        cv.METHODS[method] = timed(cv.METHODS[method])
    writer_cls = getattr(mqfile, "MqWriter", None)
    if writer_cls is not None:  # streaming writer (this tree): time its final assembly on its own
        finish = writer_cls.finish

        def timed_finish(self, *a, **k):
            if str(self.path) == spec["out"]:  # not the tokenizer-only file calibration writes
                sampler.mark("write file")
            return finish(self, *a, **k)
        writer_cls.finish = timed_finish
    cv.convert(spec["src"], spec["out"], scheme=spec["scheme"], method=method, progress=False, **kwargs)
    total = time.perf_counter() - t0
    sampler.stop()
    st = _status()
    out = Path(spec["out"])
    f = mqfile.read_mq(out)
    Path(spec["report"]).write_text(json.dumps({
        "total_s": total, "layer_s": layer_s, "stages": [(k, sampler.stages[k]) for k in sampler.order],
        "vmhwm_kb": st["VmHWM"], "peak_sampled_kb": sampler.peak_kb, "peak_stage": sampler.peak_stage,
        "peak_where": sampler.peak_where, "mq_bytes": out.stat().st_size, "mq_tensors": len(f.names()),
        "blk_bytes": sum(f.nbytes(n) for n in f.names() if n.startswith("blk.")),
        "quant_method": (f.quant or {}).get("method")}, indent=1))


# ---------------------------------------------------------------- the parent

def run_child(spec: dict) -> tuple[dict, int, float]:
    """(child's report, its ru_maxrss in kB (which includes the pre-exec forked image), its wall s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"conversion child failed (exit {proc.returncode})")
    return json.loads(Path(spec["report"]).read_text()), usage.ru_maxrss, wall


def mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="whole 7B-shaped decoder layers in the checkpoint (default 2; "
                                                          "32 = the full model)")
    ap.add_argument("--method", default="mergequant",
                    help="conversion method (mergequant.convert.quant.methods.METHODS), or 'none' for no method: every "
                         "linear packed by --scheme (default mergequant)")
    ap.add_argument("--scheme", default=None, help="with --method none: the scheme (default w4a16g); with a method: "
                                                   "its own (leave unset)")
    ap.add_argument("--calib-n", type=int, default=8, help="calibration sequences (default 8; the method's own default "
                                                           "is 32)")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    ap.add_argument("--calib", default="wikitext2+c4", help="calibration text: wikitext2 | c4 | wikitext2+c4 | FILE")
    ap.add_argument("--method-arg", action="append", default=[], metavar="KEY=JSON",
                    help="a further method keyword, e.g. rank=0 or gptq=false (repeatable)")
    ap.add_argument("--dtype", choices=("f16", "bf16"), default="f16", help="checkpoint storage dtype (default f16)")
    ap.add_argument("--workdir", default=None, help="folder for the checkpoint and the .mq (default: a new temporary "
                                                    "folder under /tmp); removed afterwards unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the .mq")
    ap.add_argument("--machine", default=None, help="machine description for the table (default: CPU model, "
                                                    "logical CPUs, memory)")
    ap.add_argument("--md", default=None, help="write the markdown (command, machine, table, stages) here")
    ap.add_argument("--json", default=None, help="write the raw measurements as JSON here")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child is not None:
        child(json.loads(a._child))
        return

    method = None if a.method in ("none", "None", "") else a.method
    scheme = a.scheme or ("w4a16g" if method is None else "f16")
    method_args: dict = {}
    if method is not None:
        from mergequant.convert.quant.methods import METHODS
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; known: none, {', '.join(METHODS)}")
        import inspect
        params = inspect.signature(METHODS[method]).parameters
        if "calib_n" in params:
            method_args = {"calib": a.calib, "calib_n": a.calib_n, "calib_len": a.calib_len}
        for kv in a.method_arg:
            k, _, v = kv.partition("=")
            method_args[k] = json.loads(v)
    calibrated = "calib_n" in method_args
    shared = shared_dir()
    os.environ["MERGEQUANT_SHARED"] = str(shared)
    tok_dir = shared / "data" / "tokenizers" / "llama2"

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="mq7b-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    ck_dir, out = work / f"llama2-7b-shape-{a.layers}L-{a.dtype}", work / "out.mq"
    try:
        need = 0.52e9 + 0.41e9 * a.layers + 2 * (0.5e9 + 0.12e9 * a.layers)
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")
        print(f"writing a {a.layers}-layer Llama-2-7B-shaped checkpoint ({a.dtype}) to {ck_dir} ...", flush=True)
        ck = write_checkpoint(ck_dir, a.layers, a.dtype, tok_dir)
        print(f"  {ck['bytes'] / 1e9:.2f} GB in {ck['write_s']:.1f} s; converting ...", flush=True)
        load_before = os.getloadavg()
        spec = {"src": str(ck_dir), "out": str(out), "method": method, "scheme": scheme, "method_args": method_args,
                "report": str(work / "child.json")}
        rep, maxrss_kb, wall = run_child(spec)
        load_after = os.getloadavg()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    m_tok = a.calib_n * a.calib_len if calibrated else 0
    w_layer = layer_fp32_bytes()
    act = 4 * m_tok * ACT_WIDTH
    act_strict = 4 * m_tok * STRICT_WIDTH
    bound, bound_strict = 2 * w_layer + act, 2 * w_layer + act_strict
    peak = rep["vmhwm_kb"] * 1024
    layers_s = rep["layer_s"]
    mean_layer = sum(layers_s) / len(layers_s)
    outside = rep["total_s"] - sum(layers_s)
    extrap = outside + FULL_LAYERS * mean_layer
    la = lambda t: " / ".join(f"{x:.2f}" for x in t)  # noqa: E731
    machine = a.machine or f"{cpu_name()}, {os.cpu_count()} logical CPUs, {mem_total_gb():.0f} GiB"
    label = method or f"none (scheme {scheme})"
    calib_s = f"{a.calib_n} x {a.calib_len} = {m_tok} tokens ({a.calib})" if calibrated else "none"
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    peak_anon = max(s["anon_kb"] for _, s in rep["stages"]) * 1024
    peak_file = max(s["file_kb"] for _, s in rep["stages"]) * 1024
    row = (f"| {a.layers} | {label} | {calib_s} | {rep['total_s']:.0f} s | "
           f"{mean_layer:.0f} s ({', '.join(f'{x:.0f}' for x in layers_s)}) | "
           f"{extrap / 60:.1f} min (extrapolated) | {gb(peak)} (anon {gb(peak_anon)}, file {gb(peak_file)}, sampled) | "
           f"{gb(bound)} | {'yes' if peak < bound else 'NO'} | {la(load_before)} → {la(load_after)} |")
    cmd = "python3 bench/convert_7b.py " + shlex.join(sys.argv[1:])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Command: `{cmd}` ({now})  ",
             f"Machine: {machine}; Python {platform.python_version()}, numpy {np.__version__}  ",
             f"Checkpoint: Llama-2-7B shape, {a.layers} layer(s), random weights (bench/peer/random_weights.py, sd 0.02) in {a.dtype}, "
             f"{ck['bytes'] / 1e9:.2f} GB, written in {ck['write_s']:.0f} s (not in the conversion time); "
             f".mq {rep['mq_bytes'] / 1e9:.3f} GB, {rep['mq_tensors']} tensors, method {rep['quant_method']!r}  ",
             f"Bound: 2 x one layer's fp32 weights ({w_layer / 1e6:.1f} MB) + one block's fp32 calibration activations "
             f"({m_tok} tokens x {ACT_WIDTH} floats = {act / 1e6:.1f} MB) = {gb(bound)}; the strict variant (residual "
             f"stream + widest intermediate, {m_tok} x {STRICT_WIDTH} floats) = {gb(bound_strict)}  ",
             f"Peak RSS: the conversion child's VmHWM = {gb(peak)} ({peak / 2**30:.2f} GiB; wait4's ru_maxrss "
             f"{gb(maxrss_kb * 1024)}, which counts the image forked before exec too); child wall "
             f"{wall:.0f} s. Load average (1 / 5 / 15 min) before → after the conversion: {la(load_before)} → "
             f"{la(load_after)}",
             "",
             "| layers | method | calibration | total wall | per layer (mean; each) | 32 layers | peak RSS | bound | "
             "below | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|",
             row,
             "",
             "Stages (wall s; sampled peak VmRSS / RssAnon / RssFile):",
             "",
             "| stage | s | RSS | anon | file |",
             "|---|---|---|---|---|"]
    for name, s in rep["stages"]:
        if name in ("start", "end"):
            continue
        lines.append(f"| {name} | {s['s']:.1f} | {gb(s['rss_kb'] * 1024)} | {gb(s['anon_kb'] * 1024)} | "
                     f"{gb(s['file_kb'] * 1024)} |")
    lines.append("")
    lines.append(f"Sampled peak {gb(rep['peak_sampled_kb'] * 1024)} in stage '{rep['peak_stage']}', the main thread at: "
                 + " ← ".join(reversed(rep["peak_where"])) + "  ")
    mq_32 = rep["mq_bytes"] + (FULL_LAYERS - a.layers) * rep.get("blk_bytes", 0) / a.layers
    lines.append(f"32 layers extrapolated: {outside:.0f} s outside the layers + 32 x {mean_layer:.1f} s = "
                 f"{extrap:.0f} s ({extrap / 60:.1f} min); the .mq would be {mq_32 / 1e9:.2f} GB (here "
                 f"{rep['mq_bytes'] / 1e9:.2f} GB), and the writer's final copy, which grows with it, is scaled with "
                 f"the rest of the time outside the layers, i.e. not at all (a few seconds a GB).")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        Path(a.md).write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "report": rep, "maxrss_kb": maxrss_kb, "bound": bound,
                                            "bound_strict": bound_strict, "layer_fp32_bytes": w_layer,
                                            "act_bytes": act, "load_before": load_before, "load_after": load_after,
                                            "extrapolated_32_s": extrap}, indent=1))


if __name__ == "__main__":
    main()
