//! `ape calibrate` on the real model: it writes its choice beside the model, `generate`
//! reads it back as its defaults (a many-shot request its own choice), and a damaged or
//! stale file is reported and ignored.

mod common;

use std::path::Path;

use common::ape;
use serde_json::Value;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/documents");

/// `ape generate --stats` over the example documents with `model`: its answer and what it
/// printed on stderr.
fn generate(model: &Path, cache: &Path) -> (String, String) {
    generate_over(model, cache, Path::new(EXAMPLES), &[])
}

/// `ape generate --stats` over the documents in `documents`, with `more` arguments.
fn generate_over(model: &Path, cache: &Path, documents: &Path, more: &[&str]) -> (String, String) {
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--contexts-dir",
        documents.to_str().unwrap(),
        "--query",
        "Where does Alice keep her bicycle?",
        "--max-tokens",
        "8",
        "--stats",
    ];
    args.extend(more);
    let output = ape(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    (String::from_utf8_lossy(&output.stdout).into_owned(), stderr)
}

/// The number of recomputed tokens `generate --stats` reports.
fn recomputed(stats: &str) -> usize {
    let line = stats
        .lines()
        .find(|l| l.starts_with("prompt "))
        .expect(stats);
    let (before, _) = line.split_once(" recomputed").expect(stats);
    before.rsplit('(').next().unwrap().parse().unwrap()
}

/// The APE temperature `generate --stats` reports reading the documents with.
fn temperature(stats: &str) -> f64 {
    let (_, after) = stats.split_once(", read ape T ").expect(stats);
    after.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn a_calibration_is_written_beside_the_model_and_read_back_as_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    // The model under another name, so that its calibration does not touch other tests.
    let model = dir.path().join("model.gguf");
    std::os::unix::fs::symlink(common::model(), &model).unwrap();
    let cache = dir.path().join("cache");

    let (uncalibrated, stats) = generate(&model, &cache);
    assert_eq!(recomputed(&stats), 0, "{stats}");

    let output = ape(&[
        "calibrate",
        "-m",
        model.to_str().unwrap(),
        "--shape",
        "documents",
        "--documents",
        EXAMPLES,
        "--n",
        "2",
        "--contexts",
        "3",
        "--temperatures",
        "0.7,0.9",
        "--scales",
        "1.0",
        "--recompute",
        "0,0.1,0.5",
        "--max-recompute",
        "0.2",
    ])
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = dir.path().join("model.ape.json");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        written["recompute"].as_f64(),
        Some(0.1),
        "the largest share within the limit: {written}"
    );
    assert_eq!(written["scale"].as_f64(), Some(1.0));
    assert!([0.7, 0.9].contains(&written["temperature"].as_f64().unwrap()));
    assert_eq!(written["by_share"].as_array().unwrap().len(), 3);
    let kl = |i: usize| written["by_share"][i]["kl"].as_f64().unwrap();
    assert!(
        kl(2) < kl(0),
        "recomputing half reads closer to sequential: {written}"
    );

    let (_, stats) = generate(&model, &cache);
    assert!(
        recomputed(&stats) > 0,
        "the calibrated share is the default: {stats}"
    );
    assert_eq!(
        temperature(&stats),
        written["temperature"].as_f64().unwrap()
    );
    // A request for another share reads with the factors calibrated at the share
    // nearest to it (the file edited so that each share's temperature tells them apart).
    let mut edited = written.clone();
    for (i, t) in [0.6, 0.8, 1.2].into_iter().enumerate() {
        edited["by_share"][i]["temperature"] = t.into();
    }
    std::fs::write(&path, edited.to_string()).unwrap();
    for (share, chosen) in [("0", 0.6), ("0.02", 0.6), ("0.4", 1.2)] {
        let more = ["--recompute", share];
        let (_, stats) = generate_over(&model, &cache, Path::new(EXAMPLES), &more);
        assert_eq!(temperature(&stats), chosen, "share {share}: {stats}");
    }
    std::fs::write(&path, written.to_string()).unwrap();
    assert!(written.get("many_shot").is_none(), "{written}");

    // Many-shot requests get their own choice, calibrated on sentiment demonstrations;
    // the documents' choice stays. A tiny labelled set stands in for the real data.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let rows: String = (0..1600)
        .map(|i| match i % 2 {
            0 => format!("\"1\",\"a warm and wonderful film , number {i} .\"\n"),
            _ => format!("\"-1\",\"a dull and lifeless film , number {i} .\"\n"),
        })
        .collect();
    std::fs::write(data.join("polarity-pang-lee.csv"), rows).unwrap();
    let output = ape(&[
        "calibrate",
        "-m",
        model.to_str().unwrap(),
        "--shape",
        "many-shot",
        "--data",
        data.to_str().unwrap(),
        "--many-shot-n",
        "2",
        "--many-shot-contexts",
        "8",
        "--many-shot-temperatures",
        "0.5",
        "--many-shot-scales",
        "0.7",
    ])
    .output()
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let both: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(both["recompute"], written["recompute"], "{both}");
    assert_eq!(both["temperature"], written["temperature"], "{both}");
    let many_shot = &both["many_shot"];
    assert_eq!(
        (
            many_shot["temperature"].as_f64(),
            many_shot["scale"].as_f64(),
            many_shot["recompute"].as_f64()
        ),
        (Some(0.5), Some(0.7), Some(0.0)),
        "{both}"
    );
    // Many-shot requests recompute nothing unless asked (`--many-shot-recompute`), and eight
    // short documents are a many-shot request: read one per context (`--group-tokens 0`);
    // grouped, they are one context and read as documents.
    let demonstrations = dir.path().join("demonstrations");
    std::fs::create_dir(&demonstrations).unwrap();
    for i in 0..8 {
        let text = format!("Fact {i}: the box number {i} is blue.");
        std::fs::write(demonstrations.join(format!("{i}.txt")), text).unwrap();
    }
    let (_, stats) = generate_over(&model, &cache, &demonstrations, &["--group-tokens", "0"]);
    assert_eq!(recomputed(&stats), 0, "{stats}");
    let (_, stats) = generate(&model, &cache);
    assert!(recomputed(&stats) > 0, "documents keep theirs: {stats}");
    let written = both;

    for (damage, says) in [
        ("{\"temperature\": ".to_string(), "not a calibration file"),
        (
            written
                .to_string()
                .replace(written["model_digest"].as_str().unwrap(), &"0".repeat(64)),
            "another model file",
        ),
    ] {
        std::fs::write(&path, damage).unwrap();
        let (answer, stats) = generate(&model, &cache);
        assert!(
            stats.contains("warning: ignoring the calibration"),
            "{stats}"
        );
        assert!(stats.contains(says), "{stats}");
        assert_eq!(recomputed(&stats), 0, "the built-in defaults: {stats}");
        assert_eq!(answer, uncalibrated);
    }
}

/// `ape model pull` puts the project's calibration of the file beside it, which `generate`
/// then reads with; a calibration already there, the user's own, is kept.
#[test]
fn pulling_a_model_brings_its_calibration_and_keeps_one_already_there() {
    let dir = tempfile::tempdir().unwrap();
    let file = "smollm2-135m-instruct-q4_1.gguf";
    let model = dir.path().join(file);
    // Installed already (the size matches), so nothing is downloaded.
    std::os::unix::fs::symlink(common::model(), &model).unwrap();
    let pull = || {
        let output = ape(&["model", "pull", "smollm2-135m", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let stdout = pull();
    let path = dir.path().join("smollm2-135m-instruct-q4_1.ape.json");
    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/calibrations/smollm2-135m-instruct-q4_1.ape.json"
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect(&stdout),
        std::fs::read_to_string(shipped).unwrap()
    );
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cache = dir.path().join("cache");
    let (_, stats) = generate(&model, &cache);
    assert_eq!(
        temperature(&stats),
        written["temperature"].as_f64().unwrap()
    );
    assert!(
        recomputed(&stats) > 0,
        "the shipped share {} is the default: {stats}",
        written["recompute"]
    );

    let mut own = written.clone();
    own["temperature"] = 0.7.into();
    for point in own["by_share"].as_array_mut().unwrap() {
        point["temperature"] = 0.7.into();
    }
    std::fs::write(&path, own.to_string()).unwrap();
    let stdout = pull();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        own.to_string(),
        "{stdout}"
    );
    let (_, stats) = generate(&model, &cache);
    assert_eq!(temperature(&stats), 0.7, "{stats}");

    // A file of the model's name and size but other bytes keeps its place and gets no
    // calibration, with a warning; the pull still succeeds.
    let other = tempfile::tempdir().unwrap();
    std::fs::File::create(other.path().join(file))
        .unwrap()
        .set_len(std::fs::metadata(common::model()).unwrap().len())
        .unwrap();
    let output = ape(&["model", "pull", "smollm2-135m", "--dir"])
        .arg(other.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: no calibration written"),
        "{stderr}"
    );
    assert!(!other
        .path()
        .join("smollm2-135m-instruct-q4_1.ape.json")
        .exists());
}
