"""Every script in benchmarks/ still imports (they are not run by the suite: a renamed helper once
left two of them failing at their first line, unseen)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_benchmark_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # they import each other (decode's CHAT, ...)
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports and definitions, not main()
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
    sys.modules.pop(f"bench_{path.stem}", None)


def test_dense_vs_moe_resumes_from_its_finished_runs(tmp_path):
    """A rerun with the same settings trains only the runs it lacks: seed 0's three runs are kept in
    --cache, so asking for two seeds afterwards trains seed 1's three and reuses seed 0's as they were."""
    import json
    import os
    import subprocess
    script = BENCH / "dense_vs_moe.py"
    common = [sys.executable, str(script), "--steps", "2", "--evals", "2", "--seeds", "1", "--max-chars", "150000",
              "--vocab", "300", "--heldout-windows", "2", "--batch-size", "2", "--seq-len", "16",
              "--cache", str(tmp_path / "cache"), "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")]
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent), "OMP_NUM_THREADS": "1"}
    subprocess.run(common, check=True, capture_output=True, env=env)
    first = json.loads((tmp_path / "r.json").read_text())
    log = next((tmp_path / "cache").glob("main-*.jsonl"))
    assert len(log.read_text().splitlines()) == 3
    subprocess.run(common + ["--seeds", "2"], check=True, capture_output=True, env=env)  # the last --seeds counts
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 6 and sorted({r["seed"] for r in lines}) == [0, 1]
    second = json.loads((tmp_path / "r.json").read_text())
    assert all(len(second["runs"][n]["heldout_loss"]) == 2 for n in first["runs"])
    assert {n: r["heldout_loss"][0] for n, r in second["runs"].items()} == {
        n: r["heldout_loss"][0] for n, r in first["runs"].items()}


def test_decode_isa_avx2_caps_torch(monkeypatch):
    """decode.py --isa avx2 hands its workers AVX2_ENV: torch in such a process dispatches AVX2 kernels
    (on an AVX-512 machine it would otherwise pick AVX512)."""
    import os
    import subprocess
    from nanoseek.cost import cpu_info
    if "avx2" not in cpu_info()[1]:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_decode_isa", BENCH / "decode.py")
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env={**os.environ, **decode.AVX2_ENV}, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "AVX2"


def test_decode_keeps_each_figures_best_policy(monkeypatch):
    """decode.py alternates nanoseek's OpenMP wait policy by round and keeps, per figure, the best round and
    the policy that gave it (a single probe on a noisy host once picked the policy that halved a mode)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_decode_best", BENCH / "decode.py")
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    into = {}
    decode.keep_best(into, {"b1": 10.0, "path": "x"}, "PASSIVE")
    decode.keep_best(into, {"b1": 12.0, "b32": 5.0}, "default")
    decode.keep_best(into, {"b1": 11.0, "b32": 6.0}, "PASSIVE")
    assert into == {"b1": 12.0, "b1_omp": "default", "path": "x", "b32": 6.0, "b32_omp": "PASSIVE"}


def test_decode_profile_refuses_a_bad_batch():
    """decode.py --profile MODE --batch N: a batch outside 1..256 is a one-line error, exit 2, before any worker."""
    import os
    import subprocess
    r = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--profile", "int8", "--batch", "0"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(BENCH.parent)})
    assert r.returncode == 2 and "--batch must be 1..256" in r.stderr and r.stdout == ""
