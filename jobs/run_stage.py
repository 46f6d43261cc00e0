"""spark-submit entry point: one stage of the MergeIT pipeline.

    spark-submit --master spark://HOST:7077 --py-files dist/mergeit_spark.zip \
        jobs/run_stage.py embed --conf conf/cluster.yaml

The first argument names the stage (ingest, decontam, embed, topics, dedup, select, group, merge,
finalize); the rest are ``mergeit run`` arguments. The stage's input tables must exist.
"""
import sys

from mergeit_spark.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: run_stage.py STAGE [mergeit run options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["run", "--stage", sys.argv[1], *sys.argv[2:]]))
