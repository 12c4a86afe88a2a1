"""The `mergequant` command line and the `mergequant-chat` binary, end to end."""
from __future__ import annotations

import os
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


def test_default_model_main_job(tmp_path, smollm2_gguf_path):
    """The README's first command: no MODEL converts the built-in model into the cache and generates."""
    env = dict(os.environ, MERGEQUANT_CACHE=str(tmp_path))
    r = mq("generate", "-p", "The capital of France is", "-n", "8", "--temp", "0", env=env)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert (tmp_path / "SmolLM2-135M-Instruct.f16.mq").is_file()


def test_generate_equals_api(smollm2_f16_mq):
    r = mq("generate", str(smollm2_f16_mq), "-p", "Once upon a time", "-n", "16", "--temp", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    want = LLM(smollm2_f16_mq, device="cpu").generate("Once upon a time", max_tokens=16, temperature=0.0)
    assert r.stdout == want + "\n"


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
