"""`llmrl` on an AMD CPU starts again with MKL's vendor check answered 'Intel' (llmrl/mkl_on_amd.py).
What shows the kernels changed is the product itself: MKL's two paths sum in another order, so
the same fp32 matmul differs in its last bits, while both stay as accurate against float64."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmrl import mkl_on_amd

# The console command's path: main() with no argv. `llmrl models` is quick and loads no model;
# the product runs after it, in the same (possibly re-executed) process.
CHILD = """
import hashlib, json, os, sys
sys.argv = ["llmrl", "models"]
from llmrl.cli import main
rc = main()
import torch
g = torch.Generator().manual_seed(0)
a, b = torch.randn(100, 3000, generator=g), torch.randn(3000, 50, generator=g)
c = a @ b
ref = a.double() @ b.double()
print(json.dumps({"rc": rc, "preload": os.environ.get("LD_PRELOAD", ""), "bits": hashlib.sha256(c.numpy().tobytes()).hexdigest(),
                  "rel_err": float((c.double() - ref).abs().max() / ref.abs().max())}))
"""


def run_cli(tmp_path: Path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", mkl_on_amd.REEXEC_MARK, mkl_on_amd.SWITCH_ENV)}
    full = {**base, "OMP_NUM_THREADS": "1", "LLMRL_KERNEL_CACHE": str(tmp_path / "kernels"), **env}
    out = subprocess.run([sys.executable, "-c", CHILD], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


amd_only = pytest.mark.skipif(not mkl_on_amd.wanted({}), reason="the preload is for AMD x86-64 CPUs under Linux")


@amd_only
def test_the_command_restarts_with_the_preload_and_mkl_takes_other_kernels(tmp_path):
    tuned = run_cli(tmp_path)
    vendor = run_cli(tmp_path, LLMRL_MKL_KERNELS="vendor")
    assert tuned["rc"] == vendor["rc"] == 0
    assert Path(tuned["preload"]).name.startswith(mkl_on_amd.LIBRARY_STEM)
    assert Path(tuned["preload"]).parent == tmp_path / "kernels"
    assert vendor["preload"] == ""
    assert tuned["bits"] != vendor["bits"], "the same product to the bit: MKL did not change kernels"
    # fp32 over 3,000 terms: both paths within a few units of the last place of the largest entry.
    # (Not every shape shows the change: at 384 x 512 x 256 both paths sum in the same order.)
    assert tuned["rel_err"] < 1e-6 and vendor["rel_err"] < 1e-6


@amd_only
def test_without_a_compiler_the_command_runs_as_before(tmp_path):
    plain = run_cli(tmp_path, CC=str(tmp_path / "no-such-compiler"), PATH="/nonexistent")
    vendor = run_cli(tmp_path / "other", LLMRL_MKL_KERNELS="vendor")
    assert plain["rc"] == 0 and plain["preload"] == ""
    assert plain["bits"] == vendor["bits"]


def test_an_unknown_choice_is_named(tmp_path):
    env = {**os.environ, "LLMRL_MKL_KERNELS": "intel"}
    env.pop(mkl_on_amd.REEXEC_MARK, None)
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['llmrl', 'models']; from llmrl.cli import main; sys.exit(main())"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "LLMRL_MKL_KERNELS='intel'" in out.stderr and "auto, vendor" in out.stderr


def test_callers_in_python_are_never_replaced(tmp_path, monkeypatch):
    monkeypatch.delenv(mkl_on_amd.REEXEC_MARK, raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("main(argv) re-executed its caller"))
    from llmrl.cli import main

    assert main(["models"]) == 0


def test_the_preload_is_taken_out_and_put_back_without_touching_other_entries(tmp_path):
    ours = str(tmp_path / f"{mkl_on_amd.LIBRARY_STEM}-abc.so")
    env = {"LD_PRELOAD": f"/opt/other.so {ours}:/opt/third.so", "HOME": "/h"}
    assert mkl_on_amd.in_effect(env)
    stripped = mkl_on_amd.without_preload(env)
    assert stripped == {"LD_PRELOAD": "/opt/other.so /opt/third.so", "HOME": "/h"}
    assert not mkl_on_amd.in_effect(stripped)
    assert "LD_PRELOAD" not in mkl_on_amd.without_preload({"LD_PRELOAD": ours})
    assert mkl_on_amd.with_preload({**env, "LLMRL_MKL_KERNELS": "vendor"})["LD_PRELOAD"] == env["LD_PRELOAD"]


def test_decode_packs_fp32_weights_for_mkl_under_the_preload_and_for_onednn_without(monkeypatch):
    """Under the preload MKL's own packed form beat both plain MKL and oneDNN's packing on 2 Zen 2
    cores (a 32-row rollout at 367 against 310 and 280 tok/s); without it, MKL's packed form was
    the slowest (210), so oneDNN packs."""
    import torch

    from llmrl.rollout import packed_linears
    from llmrl.rollout.packed_linears import mkl_takes_intel_kernels, packing_pays

    if not torch.backends.mkldnn.is_available() or not torch.backends.mkl.is_available():
        pytest.skip("this torch lacks oneDNN or MKL")
    monkeypatch.setattr(packed_linears, "cpu_field", lambda name: "AuthenticAMD" if name == "vendor_id" else "")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert packing_pays(torch.float32, torch.device("cpu")) and not mkl_takes_intel_kernels()
    monkeypatch.setenv("LD_PRELOAD", f"/cache/{mkl_on_amd.LIBRARY_STEM}-abc.so")
    assert packing_pays(torch.float32, torch.device("cpu")) and mkl_takes_intel_kernels()
