"""spark-submit entry point: the whole MergeIT pipeline.

    spark-submit --master spark://HOST:7077 --py-files dist/mergeit_spark.zip \
        jobs/run_pipeline.py --conf conf/cluster.yaml --set input.paths=[/data/in.json]

Takes the same arguments as ``mergeit run``. The master comes from spark-submit.
"""
import sys

from mergeit_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
