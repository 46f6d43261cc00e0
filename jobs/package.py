"""Build dist/mergeit_spark.zip: the library as one archive for spark-submit --py-files."""
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(out: Path = REPO / "dist" / "mergeit_spark.zip") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((REPO / "mergeit_spark").rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                zf.write(path, path.relative_to(REPO))
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "dist" / "mergeit_spark.zip"))
