"""The `mergequant` command line and the `mergequant-chat` binary, end to end."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mergequant import LLM


def mq(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergequant.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def chat_binary() -> str:
    # the binary installed beside this interpreter (the install under test), else the first on PATH
    exe = Path(sysconfig.get_path("scripts")) / "mergequant-chat"
    if not exe.exists():
        exe = Path(shutil.which("mergequant-chat") or exe)
    if not exe.exists():
        pytest.skip("mergequant-chat is not installed")
    return str(exe)


@pytest.mark.parametrize("cmd", [[], ["convert"], ["generate"], ["chat"], ["inspect"], ["eval"], ["bench"]])
def test_help(cmd):
    r = mq(*cmd, "--help")
    assert r.returncode == 0 and "usage: mergequant" in r.stdout


@pytest.fixture(scope="session")
def default_main_job(smollm2_gguf_path, tmp_path_factory):
    """The README's first command in a fresh cache: `generate` with no MODEL converts the built-in model with
    MergeQuant W4A4 (the one default-model conversion of the suite: minutes on a 2-core machine), then
    generates. Returns (the run, the cache directory)."""
    cache = tmp_path_factory.mktemp("mq_cache")
    env = dict(os.environ, MERGEQUANT_CACHE=str(cache))
    r = mq("generate", "-p", "The capital of France is", "-n", "8", "--temp", "0", "--device", "cpu", env=env,
           timeout=1200)
    assert r.returncode == 0, r.stderr
    print(f"\n[default main job] {r.stderr.strip().splitlines()[-1]}; uptime {os.getloadavg()}")  # shown with -s
    return r, cache


def test_default_model_main_job(default_main_job):
    """No MODEL: the default model's MergeQuant W4A4 file (convert --method mergequant with its default options and
    calibration), cached under a name that carries its recipe; the stages and the conversion time are printed."""
    from dataclasses import asdict

    from mergequant.convert.mqfile import read_mq
    from mergequant.convert.quant.calibrate import CalibrationSpec
    from mergequant.convert.quant.mergequant import Options
    from mergequant.default_model import default_model_file

    r, cache = default_main_job
    files = sorted(cache.glob("*.mq"))
    assert [f.name for f in files] == [f"SmolLM2-135M-Instruct.{_key('w4a4')}.mq"]
    assert re.search(r"converted SmolLM2-135M-Instruct \(w4a4\) in \d+\.\d s", r.stderr)
    for needle in ("calibration text", "layer 0: attn_qkv", "layer 29: ffn_down"):  # the stages beside the bar
        assert needle in r.stderr
    m = read_mq(files[0])
    assert m.quant["method"] == "mergequant"
    # (the recipe is JSON in the file: tuples come back as lists)
    want = {"options": asdict(Options()), "calibration": asdict(CalibrationSpec())}
    # (and ffn_down's split slots per layer, shared by the layers: alloc_down)
    assert m.quant["params"].keys() == want.keys() | {"down_slots"}
    assert {k: m.quant["params"][k] for k in want} == json.loads(json.dumps(want))
    assert len(m.quant["params"]["down_slots"]) == 30
    linears = m.quant["linears"]
    assert {s for n, s in linears.items() if n.startswith("blk.")} == {"w4a4"} and len(linears) >= 4 * 30
    os.environ["MERGEQUANT_CACHE"], old = str(cache), os.environ.get("MERGEQUANT_CACHE")
    try:
        assert default_model_file() == files[0]
    finally:
        if old is None:
            del os.environ["MERGEQUANT_CACHE"]
        else:
            os.environ["MERGEQUANT_CACHE"] = old


def _key(scheme: str) -> str:
    from mergequant.default_model import conversion_key
    return conversion_key(scheme)


def test_default_model_api_reuses_cache(default_main_job, monkeypatch):
    """LLM() with no model opens the cached MergeQuant file (no second conversion) and greedy-generates what the
    command line did."""
    r, cache = default_main_job
    monkeypatch.setenv("MERGEQUANT_CACHE", str(cache))
    (path,) = cache.glob("*.mq")
    mtime = path.stat().st_mtime_ns
    llm = LLM(device="cpu")
    assert Path(llm.path) == path and path.stat().st_mtime_ns == mtime
    assert llm.generate("The capital of France is", max_tokens=8, temperature=0.0) + "\n" == r.stdout
    assert Path(LLM(device="cpu", scheme="w4a4").path) == path


def test_default_model_main_job_generates_what_the_file_computes(default_main_job):
    """The command's greedy text is the continuation the W4A4 file computes: the numpy simulator of the file's
    integer numerics (an executor independent of the engine) picks the same tokens."""
    import numpy as np

    from mergequant.convert.quant.simulate import SimModel

    r, cache = default_main_job
    (path,) = cache.glob("*.mq")
    llm = LLM(path, device="cpu")
    sim = SimModel.from_mq(path)
    ids = llm.tokenize("The capital of France is", add_special=True)
    out: list[int] = []
    stops = {t for name in ("<|im_end|>", "<|endoftext|>") for t in llm.tokenize(name, add_special=False, special=True)}
    for _ in range(8):
        nxt = int(np.argmax(sim.forward(np.asarray(ids + out))[-1]))
        if nxt in stops:
            break
        out.append(nxt)
    assert out and llm.detokenize(out) + "\n" == r.stdout


def test_default_model_f16(tmp_path, smollm2_gguf_path, monkeypatch):
    """--scheme f16 / LLM(scheme="f16"): the unquantized file, in the same cache."""
    env = dict(os.environ, MERGEQUANT_CACHE=str(tmp_path))
    r = mq("generate", "-p", "The capital of France is", "-n", "8", "--temp", "0", "--scheme", "f16", env=env)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert sorted(f.name for f in tmp_path.glob("*.mq")) == ["SmolLM2-135M-Instruct.f16.mq"]
    monkeypatch.setenv("MERGEQUANT_CACHE", str(tmp_path))
    llm = LLM(device="cpu", scheme="f16")
    assert Path(llm.path) == tmp_path / "SmolLM2-135M-Instruct.f16.mq"
    assert llm.generate("The capital of France is", max_tokens=8, temperature=0.0) + "\n" == r.stdout


def test_default_model_scheme_refused_with_a_model(smollm2_f16_mq):
    with pytest.raises(ValueError, match="default model"):
        LLM(smollm2_f16_mq, scheme="f16")
    with pytest.raises(ValueError, match="unknown default-model scheme"):
        LLM(scheme="w4a8")
    r = mq("generate", str(smollm2_f16_mq), "--scheme", "f16", "-p", "hi", "-n", "1")
    assert r.returncode != 0 and "--scheme selects the default model" in r.stderr


def test_generate_equals_api(smollm2_f16_mq):
    r = mq("generate", str(smollm2_f16_mq), "-p", "Once upon a time", "-n", "16", "--temp", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    want = LLM(smollm2_f16_mq, device="cpu").generate("Once upon a time", max_tokens=16, temperature=0.0)
    assert r.stdout == want + "\n"


def test_generate_n_batch(smollm2_f16_mq):
    """--n-batch: the same greedy text in passes of 5 prompt tokens; an invalid value is a message naming it."""
    r = mq("generate", str(smollm2_f16_mq), "-p", "Once upon a time, in a land far away,", "-n", "12", "--temp", "0",
           "--device", "cpu", "--n-batch", "5")
    assert r.returncode == 0, r.stderr
    want = LLM(smollm2_f16_mq, device="cpu").generate("Once upon a time, in a land far away,", max_tokens=12,
                                                       temperature=0.0)
    assert r.stdout == want + "\n"
    r = mq("inspect", str(smollm2_f16_mq), "--n-batch", "64")
    assert r.returncode == 0 and "n_batch 64)" in r.stdout, r.stdout + r.stderr
    r = mq("generate", str(smollm2_f16_mq), "-p", "hi", "--device", "cpu", "--n-batch", "0")
    assert r.returncode != 0 and "invalid n_batch 0" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_inspect(smollm2_f16_mq):
    r = mq("inspect", str(smollm2_f16_mq))
    assert r.returncode == 0, r.stderr
    for needle in ("blk.0.attn_qkv.weight", "token_embd.weight", "llama", "F16"):
        assert needle in r.stdout


def test_eval_ppl(smollm2_f16_mq, shared_data):
    r = mq("eval", str(smollm2_f16_mq), "--ppl", str(shared_data / "eval" / "wiki.test.raw"), "--window", "128",
           "--max-windows", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "2 windows of 128 tokens" in r.stdout


def test_cli_error_is_a_message(tmp_path):
    bad = tmp_path / "bad.mq"
    bad.write_bytes(b"\x00" * 4)
    r = mq("generate", str(bad), "-p", "hi")
    assert r.returncode == 1
    assert "error:" in r.stderr and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_convert_tiny(tiny_hf_checkpoint, tmp_path):
    ck = tiny_hf_checkpoint()
    out = tmp_path / "t.mq"
    r = mq("convert", str(ck.path), "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    # the CLI's file is the API's conversion: same tensors and metadata, so the same logits bit for bit
    from mergequant.convert.convert import convert
    api = convert(ck.path, tmp_path / "api.mq", progress=False)
    ids = LLM(api, device="cpu").tokenize("the quick brown fox")
    np.testing.assert_array_equal(LLM(out, device="cpu").logits(ids), LLM(api, device="cpu").logits(ids))


def test_chat_binary_equals_python_chat(smollm2_f16_mq):
    """The C++ chat format and the Python Jinja rendering agree, so greedy replies are identical."""
    question = "What is the capital of France?"
    r = subprocess.run([chat_binary(), "-m", str(smollm2_f16_mq), "-p", question, "-n", "24", "--temp", "0",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = LLM(smollm2_f16_mq, device="cpu").chat([{"role": "user", "content": question}], max_tokens=24,
                                                   temperature=0.0)
    assert r.stdout == want + "\n"


def test_chat_binary_interactive(smollm2_f16_mq):
    """Two turns, /clear, /exit; the second turn reuses the first turn's KV cache."""
    script = "Hello!\nTell me a color.\n/clear\nHi\n/exit\n"
    r = subprocess.run([chat_binary(), "-m", str(smollm2_f16_mq), "-n", "8", "--temp", "0", "--timings"],
                       input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    timings = [line for line in r.stderr.splitlines() if line.startswith("[prefill")]
    assert len(timings) == 3
    assert "(0 cached)" in timings[0] and "(0 cached)" not in timings[1] and "(0 cached)" in timings[2]


def test_chat_binary_ctrl_c(smollm2_f16_mq):
    """The first SIGINT ends the reply, not the program; the program then goes on reading input."""
    import signal
    import time
    p = subprocess.Popen([chat_binary(), "-m", str(smollm2_f16_mq), "-n", "4000", "-c", "4096", "--temp", "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdin.write("Write a very long story about a dragon.\n")
    p.stdin.flush()
    time.sleep(3.0)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert p.poll() is None  # still running
    out, err = p.communicate("/exit\n", timeout=60)
    assert p.returncode == 0, err


def test_eval_kld_of_model_with_itself_is_zero(smollm2_f16_mq, shared_data):
    r = mq("eval", str(smollm2_f16_mq), "--ppl", str(shared_data / "eval" / "wiki.test.raw"), "--window", "64",
           "--max-windows", "1", "--kld", str(smollm2_f16_mq), "-q")
    assert r.returncode == 0, r.stderr
    assert "KL divergence" in r.stdout and "mean 0.000000" in r.stdout and "same top token 100.00%" in r.stdout


def test_bench(smollm2_f16_mq):
    r = mq("bench", str(smollm2_f16_mq), "-p", "32", "-n", "8", "-r", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "prefill 32 tokens" in r.stdout and "decode" in r.stdout


def test_chat_cli(smollm2_f16_mq):
    r = subprocess.run([sys.executable, "-m", "mergequant.cli", "chat", str(smollm2_f16_mq), "-n", "8", "--temp", "0",
                        "--device", "cpu"], input="Hello!\n/clear\nHi\n/exit\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 3
