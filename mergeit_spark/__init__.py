"""mergeit-spark: MergeIT instruction-data curation (topic-aware filtering + LLM merging) on Spark."""
__version__ = "0.1.0"
