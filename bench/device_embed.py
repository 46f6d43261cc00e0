"""Device check for the embed encoder where the hardware has native bf16 (issue 9).

The development machine's CPU is AVX2-only, so ``embed.precision=auto`` resolves to fp32 there and
the bf16 path cannot be timed. This script runs the stage's own encoder (``encode_texts``,
``resolve_precision``) on a lent accelerator machine, whose CPU and GPU may multiply bf16
natively, and measures, on the same real texts:

- CPU, restricted to two cores (the development machine's count): (a) the single-process
  reference ``SentenceTransformer.encode(batch_size=32, normalize_embeddings=True)`` with torch's
  threads = 2, against (b) the stage's encoder run as Spark ``local[2]`` runs it (two worker
  processes, one core and one torch thread each, token-sorted batches) at fp32, bf16 and auto;
- CUDA: the reference on the GPU against the stage's encoder at ``auto``;
- fidelity: cosine of each run's vectors to the fp32 reference (mean, min).

It needs neither Spark nor Delta (the device machine has no JVM): modules the encoder's file
imports for the stage wrapper are stubbed when absent. The encoder's timing excludes Spark's own
overhead (worker start, Arrow transfer, Delta write), which ``bench_embed.py`` measures where
Spark runs.

    .venv/bin/python bench/device_embed.py --prepare   # here: model (fp16 on the wire) + texts
    python3 bench/device_embed.py --assets .device --out "$OUT"   # there
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STUBBED = ("pyspark", "delta", "deltalake")
FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of Spark/Delta modules that are not installed resolve to inert stand-ins: the
    encoder never calls them, only the stage wrapper in the same files names them."""

    def __init__(self, names: list[str]):
        self.names = frozenset(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__ = []
        module.__spec__ = spec
        return module

    def exec_module(self, module):
        return None


def install_stubs() -> list[str]:
    """Stub whichever of STUBBED cannot be imported (all of them with MERGEIT_STUB_SPARK=1, to
    try the device path where Spark is installed)."""
    forced = os.environ.get("MERGEIT_STUB_SPARK") == "1"
    missing = []
    for name in STUBBED:
        if forced:
            missing.append(name)
            continue
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.meta_path.insert(0, _StubFinder(missing))
    return missing


def prepare(assets: Path, rows: int) -> None:
    """Here: the bundled model with fp16 weights (88 MB in fp32 is over the transfer limit) and
    ``rows`` real texts sampled as bench_embed samples them, under ``assets`` (git-ignored)."""
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    from bench.bench_embed import sample_records, texts_of
    from mergeit_spark.models import resolve_model_path
    source = Path(resolve_model_path("all-MiniLM-L6-v2"))
    shutil.rmtree(assets, ignore_errors=True)
    shutil.copytree(source, assets / "model")
    weights = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              str(assets / "model" / "model.safetensors"))
    (assets / "texts.json").write_text(json.dumps(texts_of(sample_records(rows))))


def fp32_model(assets: Path) -> Path:
    """The model folder with its weights back in fp32 (they travel as fp16 to fit the transfer)."""
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    target = Path("/tmp/device-embed-model")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(assets / "model", target)
    weights = load_file(str(target / "model.safetensors"))
    save_file({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()},
              str(target / "model.safetensors"))
    return target


def settings_for(model: Path, **changes):
    from mergeit_spark.config import EmbedSettings
    return EmbedSettings(model=str(model), **changes)


_BARRIER = None


def _set_barrier(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _stage_worker(args):
    """One Spark-like worker: pinned to one core, one torch thread, the stage's encoder."""
    core, model, texts, precision = args
    install_stubs()  # a spawned process starts without the parent's import hooks
    os.sched_setaffinity(0, {core})
    import torch
    torch.set_num_threads(1)
    from mergeit_spark import models as M
    settings = settings_for(model, precision=precision, torch_threads=1)
    M.load_model(settings)
    M.encode_texts(texts[:64], settings)  # warm-up, not timed
    _BARRIER.wait()  # both workers start together, once both models are loaded
    t0 = time.perf_counter()
    vectors = M.encode_texts(texts, settings)
    return time.perf_counter() - t0, vectors, M.worker_precision(settings)


def stage_on_two_cores(model: Path, texts: list[str], precision: str, cores: tuple[int, int]):
    import numpy as np
    half = len(texts) // 2
    parts = [texts[:half], texts[half:]]
    ctx = mp.get_context("spawn")
    with ctx.Pool(2, initializer=_set_barrier, initargs=(ctx.Barrier(2),)) as pool:
        results = pool.map(_stage_worker, [(c, model, p, precision) for c, p in zip(cores, parts)], chunksize=1)
    wall = max(r[0] for r in results)
    return wall, np.concatenate([r[1] for r in results]), {r[2] for r in results}


def reference(model: Path, texts: list[str], device: str, batch_size: int = 32):
    from sentence_transformers import SentenceTransformer
    ref = SentenceTransformer(str(model), device=device)
    ref.max_seq_length = 256
    ref.encode(texts[:64], batch_size=batch_size)
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    vectors = ref.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return time.perf_counter() - t0, vectors


def cosine(ours, ref) -> dict:
    import numpy as np
    cos = (ours * ref).sum(axis=1)
    return {"mean": round(float(cos.mean()), 7), "min": round(float(cos.min()), 7),
            "max_abs": float(np.abs(ours - ref).max())}


def cpu_part(model: Path, texts: list[str], facts: dict) -> dict:
    import torch
    cores = tuple(sorted(os.sched_getaffinity(0)))[:2]
    os.sched_setaffinity(0, set(cores))
    torch.set_num_threads(2)
    ref_wall, ref_vec = reference(model, texts, "cpu")
    out = {"cores": list(cores), "reference_rows_s": len(texts) / ref_wall, "runs": {}}
    print(f"cpu reference encode(batch 32, 2 threads): {out['reference_rows_s']:.1f} rows/s", flush=True)
    for precision in ("fp32", "bf16", "auto"):
        wall, vec, used = stage_on_two_cores(model, texts, precision, cores)
        rate = len(texts) / wall
        out["runs"][precision] = {"rows_s": rate, "ratio": rate / out["reference_rows_s"],
                                  "resolved": sorted(used), "cosine_to_fp32_reference": cosine(vec, ref_vec)}
        print(f"cpu stage encoder {precision} ({','.join(sorted(used))}): {rate:.1f} rows/s = "
              f"{rate / out['reference_rows_s']:.2f}x; cosine {out['runs'][precision]['cosine_to_fp32_reference']}",
              flush=True)
    ref_wall2, _ = reference(model, texts, "cpu")
    out["reference_rows_s_last"] = len(texts) / ref_wall2
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return out, ref_vec


def cuda_part(model: Path, texts: list[str], cpu_ref) -> dict:
    import torch
    from mergeit_spark import models as M
    if not torch.cuda.is_available():
        return {"available": False}
    out = {"available": True, "name": torch.cuda.get_device_name(0),
           "auto": M.resolve_precision("auto", "cuda"), "runs": {}}
    wall, ref_vec = reference(model, texts, "cuda")
    out["reference_rows_s"] = len(texts) / wall
    out["reference_cosine_to_cpu_fp32"] = cosine(ref_vec, cpu_ref)
    for precision, batch in (("fp32", 32), ("auto", 32), ("auto", 256)):
        settings = settings_for(model, device="cuda", precision=precision, batch_size=batch, torch_threads=0)
        M.encode_texts(texts[:256], settings)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        vec = M.encode_texts(texts, settings)
        torch.cuda.synchronize()
        rate = len(texts) / (time.perf_counter() - t0)
        out["runs"][f"{precision}_b{batch}"] = {
            "resolved": M.worker_precision(settings), "rows_s": rate, "ratio": rate / out["reference_rows_s"],
            "cosine_to_cpu_fp32_reference": cosine(vec, cpu_ref)}
        print(f"cuda stage encoder {precision} batch {batch}: {rate:.0f} rows/s "
              f"({rate / out['reference_rows_s']:.2f}x cuda reference)", flush=True)
    return out


def cuda_variants(model: Path, texts: list[str], cpu_ref) -> dict:
    """The stage's encoder on the GPU at fp32 and bf16 over batch sizes, each timed on a second
    pass (the first one sees every shape)."""
    import torch
    from mergeit_spark import models as M
    out = {}
    for precision, batch in (("fp32", 32), ("fp32", 256), ("fp32", 1024),
                             ("bf16", 32), ("bf16", 256), ("bf16", 1024)):
        settings = settings_for(model, device="cuda", precision=precision, batch_size=batch, torch_threads=0)
        M.encode_texts(texts, settings)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        vec = M.encode_texts(texts, settings)
        torch.cuda.synchronize()
        rate = len(texts) / (time.perf_counter() - t0)
        out[f"{precision}_b{batch}"] = {"rows_s": rate, "cosine_to_cpu_fp32_reference": cosine(vec, cpu_ref)}
        print(f"cuda stage encoder {precision} batch {batch}: {rate:.0f} rows/s, cosine "
              f"{out[f'{precision}_b{batch}']['cosine_to_cpu_fp32_reference']}", flush=True)
    return out


def facts_of_machine() -> dict:
    import torch
    from mergeit_spark import models as M
    flags = M.cpu_flags()
    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), "?")
    return {"cpu": model_name, "cores": os.cpu_count(), "flags": [f for f in FLAGS_SHOWN if f in flags],
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "auto_cpu": M.resolve_precision("auto", "cpu")}


def _cos(c: dict) -> str:
    return f"{c['mean']:.7f} / {c['min']:.7f}"


def render(results: list[dict]) -> str:
    """BENCHMARKS.md text for device runs (``device_embed.json`` files, in order)."""
    lines = []
    for n, r in enumerate(results, 1):
        m = r["machine"]
        lines.append(f"### run {n}: {r['date']}, {r['rows']} real rows, {m['cpu']} ({m['cores']} cores; "
                     f"flags {', '.join(m['flags'])}), torch {m['torch']}, auto on this CPU = {m['auto_cpu']}\n")
        cpu = r["cpu_two_cores"]
        if not cpu.get("skipped"):
            ref = cpu["reference_rows_s"]
            lines += [f"CPU, two cores ({cpu['cores']}): reference `encode(batch_size=32)` with 2 threads "
                      f"{ref:.1f} rows/s first, {cpu['reference_rows_s_last']:.1f} last; stage encoder as "
                      "`local[2]` runs it (2 processes x 1 core x 1 thread, token-sorted batches of 32). "
                      "Ratios against the faster (first) reference run.\n",
                      "| precision | resolved | rows/s | ratio to reference | cosine to fp32 reference (mean / min) |",
                      "| --- | --- | ---: | ---: | --- |"]
            for name, run in cpu["runs"].items():
                lines.append(f"| {name} | {','.join(run['resolved'])} | {run['rows_s']:.1f} | {run['ratio']:.2f}x "
                             f"| {_cos(run['cosine_to_fp32_reference'])} |")
            lines.append("")
        cuda = r["cuda"]
        if cuda.get("available"):
            lines += [f"GPU {cuda['name']}: auto resolves to {cuda['auto']}; reference `encode(batch_size=32)` on "
                      f"the GPU {cuda['reference_rows_s']:.0f} rows/s. Stage encoder, warmed on 256 rows "
                      "(a cold pass: most batch shapes first seen while timed):\n",
                      "| run | resolved | rows/s | cosine to CPU fp32 reference (mean / min) |",
                      "| --- | --- | ---: | --- |"]
            for name, run in cuda["runs"].items():
                lines.append(f"| {name} | {run['resolved']} | {run['rows_s']:.0f} | "
                             f"{_cos(run['cosine_to_cpu_fp32_reference'])} |")
            lines.append("")
            if cuda.get("variants"):
                lines += ["Stage encoder timed on a second pass over the same rows (every shape seen once):\n",
                          "| precision, batch | rows/s | cosine to CPU fp32 reference (mean / min) |",
                          "| --- | ---: | --- |"]
                for name, run in cuda["variants"].items():
                    lines.append(f"| {name} | {run['rows_s']:.0f} | {_cos(run['cosine_to_cpu_fp32_reference'])} |")
                lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=REPO / ".device")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--skip-cpu", action="store_true", help="only the fp32 CPU reference, no CPU timings")
    parser.add_argument("--cuda-variants", action="store_true", help="also time bf16 ways on the GPU")
    parser.add_argument("--prepare", action="store_true", help="here: write the assets and stop")
    parser.add_argument("--write-from", type=Path, nargs="+", help="here: device_embed.json files from "
                        "device runs -> the embed-device section of BENCHMARKS.md")
    parser.add_argument("--notes", type=Path, help="with --write-from: a text file appended to the section")
    args = parser.parse_args()
    if args.write_from:
        from bench._common import write_section
        body = render([json.loads(p.read_text()) for p in args.write_from])
        if args.notes:
            body += "\n" + args.notes.read_text()
        write_section("embed-device", body, ran_on="a lent device machine (below: its CPU and GPU)",
                      command="python3 bench/device_embed.py --assets .device --rows 2000 [--skip-cpu --cuda-variants]; "
                              "assets made here first: .venv/bin/python bench/device_embed.py --prepare --rows 3000")
        return
    if args.prepare:
        prepare(args.assets, args.rows)
        return
    stubbed = install_stubs()
    model = fp32_model(args.assets)
    texts = json.loads((args.assets / "texts.json").read_text())[:args.rows]
    facts = facts_of_machine()
    facts["stubbed_modules"] = stubbed
    print(json.dumps(facts), flush=True)
    if args.skip_cpu:
        cpu, cpu_ref = {"skipped": True}, reference(model, texts, "cpu")[1]
    else:
        cpu, cpu_ref = cpu_part(model, texts, facts)
    cuda = cuda_part(model, texts, cpu_ref)
    if cuda.get("available") and args.cuda_variants:
        cuda["variants"] = cuda_variants(model, texts, cpu_ref)
    result = {"machine": facts, "rows": len(texts), "cpu_two_cores": cpu, "cuda": cuda,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_embed.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
