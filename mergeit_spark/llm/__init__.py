"""LLM merging: the prompt (``prompt``), the async OpenAI-protocol client with retries, budget and
structured output (``client``), the embedding quality gate (``gate``) and the offline local
server (``server``). The merge stage (``mergeit_spark.stages.merge``) wires them onto Spark."""
