"""The merge plan against the run it plans: `mergeit plan --sample N`, then the real merge stage.

On all of ../shared/data (a copy of a run root embedded by the pipeline, `--root-from`, so the
embedding is not paid again) with local.yaml: the pipeline up to `group`, then the plan with a
sample merged for real against the scripted loopback server with faults, then the merge stage
(which pays only what the sample did not). Planned and actual requests, prompt and completion
tokens and cost side by side (section `plan` of BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, write_section

sys.path.insert(0, str(REPO / "tests"))
from fake_openai import FakeOpenAI, Faults  # noqa: E402

from mergeit_spark.config import load_settings  # noqa: E402
from mergeit_spark.llm.spend import Prices  # noqa: E402
from mergeit_spark.pipeline import Pipeline  # noqa: E402
from mergeit_spark.plan import plan_merge  # noqa: E402

SHARED = (REPO / ".." / "shared" / "data").resolve()
INPUTS = ["alpaca-seed-tasks.jsonl", "gpteacher-roleplay.json", "gpteacher-toolformer.json", "mergeit-6k.json"]
PRICES = Prices(input_per_million=0.5, output_per_million=1.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root-from", required=True, help="a run root of all ../shared/data, embedded")
    parser.add_argument("--sample", type=int, default=20)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--latency-ms", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        root = Path(tmp) / "run"
        shutil.copytree(args.root_from, root)
        with FakeOpenAI(latency_s=args.latency_ms / 1000) as fake:
            fake.script = Faults(rate=args.fault_rate, hang_s=3.0) if args.fault_rate else None
            settings = load_settings([REPO / "conf" / "local.yaml"], overrides=[
                f"input.paths=[{','.join(str(SHARED / name) for name in INPUTS)}]", f"output.root={root}",
                f"llm.base_url={fake.base_url}", "llm.model=fake-model", "llm.request_timeout_s=2",
                "llm.backoff_initial_s=0.2", "llm.backoff_max_s=2", "merge.progress_interval_s=30",
                f"llm.price_input_per_million={PRICES.input_per_million}",
                f"llm.price_output_per_million={PRICES.output_per_million}"], env={})
            pipeline = Pipeline(settings)
            started = time.perf_counter()
            plan = plan_merge(pipeline, sample=args.sample)
            planned_s = time.perf_counter() - started
            print(plan.table(), flush=True)
            sampled = fake.count
            started = time.perf_counter()
            pipeline.run(until="merge")
            merge_s = time.perf_counter() - started
            sent = fake.count - sampled
        merges = pipeline.store.read("merges").toPandas()
    prompt = int(merges["prompt_tokens"].sum()) - plan.history["prompt_tokens"]
    completion = int(merges["completion_tokens"].sum()) - plan.history["completion_tokens"]
    actual = {"requests": sent, "prompt tokens": prompt, "completion tokens": completion,
              "cost": PRICES.cost(prompt, completion)}
    planned = {"requests": plan.requests, "prompt tokens": plan.prompt_tokens,
               "completion tokens": plan.completion_tokens, "cost": plan.cost}
    rows = []
    for name, figure in planned.items():
        value = actual[name]
        fmt = "{:.4f}" if name == "cost" else "{:,.0f}"
        rows.append(f"| {name} | {fmt.format(figure.value)} ({figure.source}) | {fmt.format(value)} | "
                    f"{figure.value / value:.3f} |" if value else f"| {name} | {fmt.format(figure.value)} | 0 | |")
    body = (f"All of ../shared/data ({plan.groups} merge groups), local.yaml, scripted loopback server "
            f"({args.latency_ms} ms a reply, {args.fault_rate:.0%} of requests failing: 500s, 429s, hangs past "
            f"the 2 s timeout), prices {PRICES.input_per_million} / {PRICES.output_per_million} per million "
            f"prompt / completion tokens. `plan_merge(sample={args.sample})` ({planned_s:.0f} s, its "
            f"{plan.sampled} sampled groups paid and recorded), then the merge stage ({merge_s:.0f} s), which "
            f"sent requests for the {plan.to_send} groups the sample left.\n\n"
            "| | planned (source) | actual | planned / actual |\n| --- | ---: | ---: | ---: |\n"
            + "\n".join(rows) + "\n\nThe plan's wall-time figure: "
            f"{plan.seconds.value:.0f} s ({plan.seconds.note}); the merge stage took {merge_s:.0f} s.")
    write_section("plan", body)
    print(body)


if __name__ == "__main__":
    main()
