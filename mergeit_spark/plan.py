"""``mergeit plan``: what the merge stage will send and what it will cost, before it sends it.

The pipeline runs up to ``group`` (current tables are reused). Executor tasks then look at every
group the way the merge stage's tasks do: a group the ledger already answers (a terminal result
for its request, or a failure a rerun does not repay) costs nothing; the others are counted with
their prompt-token estimate (``llm.tokens``: rates meant never to fall short of a real tokenizer).
The figures a plan cannot count are taken from the ledger's history of this run root when it has
one (measured), else assumed, and the plan says which:

* requests per group: attempts per recorded result (regenerations and retries included), else 1;
* completion tokens per request: from the server's usage, else ``llm.max_tokens`` (an upper bound);
* prompt tokens: counted with the model's tokenizer when ``llm.tokenizer`` names one (counted,
  ``llm.tokenizer``), else the estimate, scaled by what the server billed for the same requests
  when the ledger has results for groups of this run root (calibrated), else the estimate as it is;
* latency per request: from the ledger, else assumed (``ASSUMED_LATENCY_S``);
* gate pass rate: merged results of all recorded results.

Cost is the tokens at ``llm.price_*_per_million``; time is the requests at the rate the settings
allow (``llm.concurrency`` per task times the tasks at once, over the latency, and the per-minute
limits). ``--sample N`` first merges N groups the ledger does not hold, for real: they are recorded
in the ledger like any merge, so the run never pays for them again, and the plan's figures are
then measured on them.

Every plan is recorded in the run root's log ``plans`` (``record_plan``): when it was made, its
figures, the groups it covered and what its sample paid, and how many merge passes the run log
held then, so that the report can set it against what the merge passes after it sent.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from .config import LLMSettings, MergeSettings, Settings
from .session import parallelism
from .fs import Location
from .llm.ledger import BucketState, read_bucket
from .llm.prompt import build_messages
from .llm.spend import Prices
from .llm.tokenizer import PromptCounter
from .llm.tokens import estimate_prompt_tokens

ASSUMED_LATENCY_S = 10.0   # per request, when the ledger has measured none
SAMPLE_SEED = 42
PLAN_LOG = "plans"         # the run root's log of plans (TableStore.append_log)
SPEND_KEYS = ("requests", "prompt_tokens", "completion_tokens", "preflight_requests", "preflight_tokens")

_PLANNED_SCHEMA = T.StructType([
    T.StructField("group_id", T.StringType()), T.StructField("request_hash", T.StringType()),
    T.StructField("answered", T.BooleanType()), T.StructField("prompt_estimate", T.LongType()),
])

_PLANNED_ARROW = to_arrow_schema(_PLANNED_SCHEMA)


@dataclass(frozen=True)
class _PlanGroups:
    """For each job (``stages.merge.JOB_SCHEMA``): whether the ledger answers it without a request,
    and its prompt tokens: counted with ``counter`` (``llm.tokenizer``) when there is one, else
    estimated. Runs in executor tasks, a bucket's ledger read once per task."""
    ledger_root: Location
    merge: MergeSettings
    counter: PromptCounter | None = None

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from .stages.merge import MISSING_HASH, TEXT_FIELDS, answered_by_ledger, decode_jobs
        buckets: dict[int, BucketState] = {}
        for batch in batches:
            out: dict[str, list] = {f.name: [] for f in _PLANNED_SCHEMA.fields}
            for job in decode_jobs(batch):
                if job.bucket not in buckets:
                    buckets[job.bucket] = read_bucket(self.ledger_root, job.bucket)
                line = buckets[job.bucket].latest.get((job.group_id, job.request_hash))
                sendable = job.request_hash != MISSING_HASH
                answered = not sendable or (line is not None and answered_by_ledger(line, self.merge))
                messages = build_messages([{f: m[f] for f in TEXT_FIELDS} for m in job.members]) if sendable else []
                out["group_id"].append(job.group_id)
                out["request_hash"].append(job.request_hash)
                out["answered"].append(answered)
                count = self.counter.count if self.counter is not None else estimate_prompt_tokens
                out["prompt_estimate"].append(count(messages) if sendable else 0)
            yield pa.RecordBatch.from_pydict(out, schema=_PLANNED_ARROW)


@dataclass
class Figure:
    """One figure of a plan and where it comes from: ``measured`` (the ledger's history),
    ``assumed`` (a stated default), ``estimated`` or ``calibrated`` (prompt tokens), ``counted``."""
    value: float
    source: str
    note: str = ""


@dataclass
class MergePlan:
    """What the merge stage will send for one model."""
    model: str
    groups: int
    answered: int                      # by the ledger: not paid again
    to_send: int
    requests: Figure
    prompt_tokens: Figure
    completion_tokens: Figure
    cost: Figure
    seconds: Figure
    gate_pass_rate: Figure | None = None
    sampled: int = 0
    history: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The plan as a small human table."""
        rows = [("model", self.model, ""), ("groups", self.groups, ""),
                ("already paid (ledger)", self.answered, ""), ("groups to send", self.to_send, "")]
        if self.sampled:
            rows.append(("sampled now (paid, in the ledger)", self.sampled, ""))
        for name, fig in (("requests", self.requests), ("prompt tokens", self.prompt_tokens),
                          ("completion tokens", self.completion_tokens), ("cost", self.cost),
                          ("wall time (s)", self.seconds), ("gate pass rate", self.gate_pass_rate)):
            if fig is not None:
                value = f"{fig.value:.4f}" if name in ("cost", "gate pass rate") else f"{fig.value:,.0f}"
                rows.append((name, value, fig.source + (f": {fig.note}" if fig.note else "")))
        width = max(len(str(r[0])) for r in rows)
        return "\n".join(f"{name:<{width}}  {str(value):>14}  {how}".rstrip() for name, value, how in rows)


def ledger_history(spark: SparkSession, ledger_root: Location, planned: DataFrame) -> dict[str, Any]:
    """What the ledger's recorded results say (every run): results, attempts, tokens, latency,
    merged results; and for the results whose request is one of ``planned``'s, the prompt tokens the
    server billed against the estimate of those requests (the calibration)."""
    from .llm.ledger import IDENTITY
    from .stages.merge import LEDGER_SCHEMA, ledger_lines
    lines = ledger_lines(spark, ledger_root, LEDGER_SCHEMA)
    if lines is None:
        return {}
    lines = lines.where(F.col("status").isNotNull() & (F.col("attempts") > 0)).dropDuplicates(list(IDENTITY))
    totals = lines.agg(F.count("*").alias("results"), F.sum("attempts").alias("attempts"),
                       F.sum("prompt_tokens").alias("prompt_tokens"),
                       F.sum("completion_tokens").alias("completion_tokens"),
                       F.sum("latency_ms").alias("latency_ms"),
                       F.sum(F.when(F.col("status") == "merged", 1).otherwise(0)).alias("merged")).first()
    if not totals or not totals["results"]:
        return {}
    calibration = (lines.join(planned.select("group_id", "request_hash", "prompt_estimate"),
                              ["group_id", "request_hash"])
                   .agg(F.sum("prompt_tokens").alias("billed"),
                        F.sum(F.col("prompt_estimate") * F.col("attempts")).alias("estimated")).first())
    history = {k: (float(totals[k] or 0) if k == "latency_ms" else int(totals[k] or 0))
               for k in ("results", "attempts", "prompt_tokens", "completion_tokens", "latency_ms", "merged")}
    history.update(billed_prompt_tokens=int(calibration["billed"] or 0),
                   estimated_prompt_tokens=int(calibration["estimated"] or 0))
    return history


def make_plan(settings: Settings, planned: DataFrame, history: dict[str, Any], slots: int,
              sampled: int = 0) -> MergePlan:
    """The plan from the planned groups (``_PlanGroups``' rows) and the ledger's history."""
    llm = settings.llm
    row = planned.agg(F.count("*").alias("groups"), F.sum(F.col("answered").cast("int")).alias("answered"),
                      F.sum(F.when(~F.col("answered"), F.col("prompt_estimate"))).alias("estimate")).first()
    groups, answered = int(row["groups"] or 0), int(row["answered"] or 0)
    to_send, estimate = groups - answered, int(row["estimate"] or 0)
    attempts = history.get("attempts", 0)
    if attempts:
        per_group = Figure(attempts / history["results"], "measured",
                           f"{attempts} requests for {history['results']} recorded results")
        completion = Figure(history["completion_tokens"] / attempts, "measured", "per request, as billed")
        latency = Figure(history["latency_ms"] / attempts / 1000.0, "measured", "per request")
        gate = Figure(history["merged"] / history["results"], "measured", "merged of recorded results")
    else:
        per_group = Figure(1.0, "assumed", "one request per group; regenerations unknown")
        completion = Figure(float(llm.max_tokens), "assumed", "llm.max_tokens, an upper bound")
        latency = Figure(ASSUMED_LATENCY_S, "assumed", "per request")
        gate = None
    requests = to_send * per_group.value
    counter = PromptCounter.from_settings(llm)
    if counter is not None:
        prompt = Figure(estimate * per_group.value, "counted",
                        f"with llm.tokenizer {counter.name}, the model's own tokenizer and chat template")
    elif history.get("estimated_prompt_tokens"):
        ratio = history["billed_prompt_tokens"] / history["estimated_prompt_tokens"]
        prompt = Figure(estimate * per_group.value * ratio, "calibrated",
                        f"estimate x {ratio:.3f}, what the server billed for recorded requests")
    else:
        prompt = Figure(estimate * per_group.value, "estimated",
                        "llm.tokens' rates, meant to count high; no billed requests to calibrate against")
    completion_total = Figure(requests * completion.value, completion.source, completion.note)
    batch = llm.mode == "batch"
    cost = Prices.from_settings(llm).of(batch).cost(prompt.value, completion_total.value)
    priced = "llm.price_*_per_million" if llm.price_input_per_million or llm.price_output_per_million \
        else "no llm.price_* set: 0"
    if batch:
        priced += f", less llm.price_batch_discount {llm.price_batch_discount:g} (llm.mode=batch)"
    seconds = Figure(requests / _requests_per_second(llm, settings.merge, slots, latency.value,
                                                     (prompt.value + completion_total.value) / max(requests, 1)),
                     latency.source, f"latency {latency.value:.2f} s per request ({latency.source}), "
                                     "concurrency and per-minute limits")
    if batch:
        seconds = Figure(seconds.value, "assumed", "llm.mode=batch: each pass's batches take up to "
                         f"llm.batch_completion_window ({llm.batch_completion_window}); this is the online time")
    return MergePlan(model=llm.model, groups=groups, answered=answered, to_send=to_send,
                     requests=Figure(requests, per_group.source, per_group.note), prompt_tokens=prompt,
                     completion_tokens=completion_total,
                     cost=Figure(cost, "priced", f"{priced}; tokens {prompt.source}/{completion.source}"),
                     seconds=seconds, gate_pass_rate=gate, sampled=sampled, history=history)


def _requests_per_second(llm: LLMSettings, merge: MergeSettings, slots: int, latency_s: float,
                         tokens_per_request: float) -> float:
    """The request rate the settings allow: every task's concurrency over the latency, capped by
    ``llm.requests_per_minute`` and ``llm.tokens_per_minute``."""
    tasks = max(1, min(merge.partitions or slots, slots))
    rate = tasks * llm.concurrency / max(latency_s, 1e-3)
    if llm.requests_per_minute > 0:
        rate = min(rate, llm.requests_per_minute / 60.0)
    if llm.tokens_per_minute > 0 and tokens_per_request > 0:
        rate = min(rate, llm.tokens_per_minute / 60.0 / tokens_per_request)
    return rate


def plan_merge(pipeline: Any, sample: int = 0) -> MergePlan:
    """Run ``pipeline`` up to ``group``, optionally merge ``sample`` unpaid groups for real (under
    the run root's lease), plan the merge stage and record the plan in the run root's log."""
    from .stages.merge import LEDGER_NAME, build_jobs, bucket_ranges
    pipeline.run(until="group")
    store, settings, spark = pipeline.store, pipeline.settings, pipeline.spark
    ledger_root = store.ledger_path(LEDGER_NAME)
    slots = parallelism(spark)
    jobs = build_jobs(store.read("merge_groups"), store.read("records"), store.read("embeddings"), settings.llm)
    jobs = jobs.persist()
    cached = [jobs]

    def planned_groups() -> DataFrame:
        planned = (bucket_ranges(jobs, max(1, min(settings.merge.partitions or slots, 256)))
                   .mapInArrow(_PlanGroups(ledger_root, settings.merge, PromptCounter.from_settings(settings.llm)),
                               _PLANNED_SCHEMA).persist())
        cached.append(planned)
        return planned

    try:
        planned, spent = planned_groups(), no_sample()
        if sample > 0:
            chosen = (planned.where(~F.col("answered")).orderBy(F.xxhash64("group_id", F.lit(SAMPLE_SEED)))
                      .limit(sample).select("group_id"))
            with pipeline.holding_root():
                spent = _merge_sample(jobs.join(chosen, "group_id", "left_semi"), settings, ledger_root)
            # The sample is in the ledger now. The same plan again would be served from the cache
            # (Spark matches a cached plan by its query), so the first is dropped before.
            planned.unpersist()
            planned = planned_groups()
        history = ledger_history(spark, ledger_root, planned)
        plan = make_plan(settings, planned, history, slots, spent["groups"])
    finally:
        for frame in cached:
            frame.unpersist()
    with pipeline.holding_root():   # one writer of the run root's logs at a time
        record_plan(store, plan, spent)
    return plan


def _merge_sample(picked: DataFrame, settings: Settings, ledger_root: Location) -> dict[str, Any]:
    """Merge the ``picked`` jobs for real, through the merge stage's request pass (preflight
    included), and say what that paid in the merge run summary's terms (``MergeRunSummary``):
    groups, the groups' requests and tokens, the preflight apart, the cost of all of it, seconds."""
    from .stages.merge import plan_requests, refuse_open_batches, request_pass
    refuse_open_batches(ledger_root)   # the sample is sent online
    started = time.perf_counter()
    requested = plan_requests(picked, settings, ledger_root, has_groups=not picked.isEmpty())
    passed, _ = request_pass(picked, settings, ledger_root, plan=requested)
    row = passed.agg(F.count("*").alias("groups"), F.sum("paid_requests").alias("requests"),
                     F.sum("paid_prompt_tokens").alias("prompt_tokens"),
                     F.sum("paid_completion_tokens").alias("completion_tokens")).first()
    spent = {k: int(row[k] or 0) for k in ("groups", "requests", "prompt_tokens", "completion_tokens")}
    checked = requested.preflight
    cost = Prices.from_settings(settings.llm).cost(spent["prompt_tokens"] + checked.prompt_tokens,
                                                   spent["completion_tokens"] + checked.completion_tokens)
    return spent | {"preflight_requests": checked.requests, "preflight_tokens": checked.tokens, "cost": cost,
                    "seconds": round(time.perf_counter() - started, 3)}


def no_sample() -> dict[str, Any]:
    """What a plan without ``--sample`` paid, in ``_merge_sample``'s keys: nothing."""
    return {"groups": 0, **{k: 0 for k in SPEND_KEYS}, "cost": 0.0, "seconds": 0.0}


def record_plan(store: Any, plan: MergePlan, sample: dict[str, Any]) -> dict[str, Any]:
    """Append ``plan`` to the run root's log ``PLAN_LOG`` and return the entry: when it was made
    (UTC), its figures, the groups it covered, what its sample paid, and how many merge passes
    the run log held then. The report compares the plan with the passes logged after that count
    (a run log time has one-second steps: it cannot order a plan and a pass within one second).
    Call it holding the run root's lease, as the merge stage writes the run log under it."""
    from .stages.merge import merge_runs
    entry = {"made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "merge_runs_before": len(merge_runs(store)),
             "covered": {"groups": plan.groups, "answered": plan.answered, "to_send": plan.to_send,
                         "sampled": plan.sampled},
             "sample": sample, "plan": plan.as_dict()}
    store.append_log(PLAN_LOG, entry)
    return entry


def recorded_plans(store: Any) -> list[dict[str, Any]]:
    """The plans recorded under the store's run root (``record_plan``), oldest first."""
    return [e for e in store.read_log(PLAN_LOG) if isinstance(e.get("plan"), dict)]
