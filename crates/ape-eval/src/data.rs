//! Readers for the files `scripts/eval-data.sh` installs, each turned into plain records.
//! A missing file is reported with the command that installs it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{EvalError, Result};

pub(crate) const SQUAD_FILE: &str = "squad-dev-v1.1-sample.json";
pub(crate) const INTENT_FILE: &str = "intent-recognition.json";
pub(crate) const POLARITY_FILE: &str = "polarity-pang-lee.csv";
pub(crate) const ESSAYS_DIR: &str = "paul-graham";

/// One SQuAD article: its paragraphs and their questions.
#[derive(Debug, Deserialize)]
pub(crate) struct Article {
    pub paragraphs: Vec<Paragraph>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Paragraph {
    pub context: String,
    pub qas: Vec<Question>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Question {
    pub id: String,
    pub question: String,
    pub answers: Vec<Answer>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Answer {
    pub text: String,
}

/// A text with its class label.
#[derive(Debug, Clone)]
pub(crate) struct Labelled {
    pub text: String,
    pub label: String,
}

fn existing(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(EvalError::MissingData { path })
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| EvalError::BadData {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn bad(path: &Path, reason: impl ToString) -> EvalError {
    EvalError::BadData {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The articles of the SQuAD v1.1 dev set.
pub(crate) fn squad(dir: &Path) -> Result<Vec<Article>> {
    #[derive(Deserialize)]
    struct File {
        data: Vec<Article>,
    }
    let path = existing(dir, SQUAD_FILE)?;
    let file: File = serde_json::from_str(&read(&path)?).map_err(|e| bad(&path, e))?;
    Ok(file.data)
}

/// BIG-bench intent recognition: utterances and their intent.
pub(crate) fn intents(dir: &Path) -> Result<Vec<Labelled>> {
    #[derive(Deserialize)]
    struct File {
        examples: Vec<Example>,
    }
    #[derive(Deserialize)]
    struct Example {
        input: String,
        target_scores: std::collections::BTreeMap<String, f64>,
    }
    let path = existing(dir, INTENT_FILE)?;
    let file: File = serde_json::from_str(&read(&path)?).map_err(|e| bad(&path, e))?;
    file.examples
        .into_iter()
        .map(|e| {
            let label = e
                .target_scores
                .iter()
                .find(|(_, &score)| score == 1.0)
                .map(|(label, _)| label.clone())
                .ok_or_else(|| bad(&path, format!("no intent scored 1 for `{}`", e.input)))?;
            let text = e.input.trim_start_matches("Utterance:").trim().to_string();
            Ok(Labelled { text, label })
        })
        .collect()
}

/// Pang & Lee sentence polarity: `"1"` or `"-1"`, then the sentence, as quoted CSV.
pub(crate) fn polarity(dir: &Path) -> Result<Vec<Labelled>> {
    let path = existing(dir, POLARITY_FILE)?;
    let text = read(&path)?;
    let rows = parse_csv(text.trim_start_matches('\u{feff}')).map_err(|e| bad(&path, e))?;
    rows.into_iter()
        .filter(|row| !row.iter().all(|f| f.trim().is_empty()))
        .map(|row| {
            let [label, sentence] = row.as_slice() else {
                return Err(bad(
                    &path,
                    format!("a row has {} fields, expected 2", row.len()),
                ));
            };
            let label = match label.as_str() {
                "1" => "positive",
                "-1" => "negative",
                other => return Err(bad(&path, format!("unknown polarity `{other}`"))),
            };
            Ok(Labelled {
                text: sentence.split_whitespace().collect::<Vec<_>>().join(" "),
                label: label.to_string(),
            })
        })
        .collect()
}

/// Fields of RFC 4180 CSV: quoted fields may hold commas, newlines and doubled quotes.
fn parse_csv(text: &str) -> std::result::Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, '\r') => {}
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".to_string());
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

/// The Paul Graham essays, by file name, their whitespace collapsed to single spaces.
pub(crate) fn essays(dir: &Path) -> Result<Vec<(String, String)>> {
    let folder = existing(dir, ESSAYS_DIR)?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(&folder)
        .map_err(|e| bad(&folder, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(bad(&folder, "the folder has no essays (*.txt)"));
    }
    names
        .iter()
        .map(|p| {
            let text = read(p)?;
            let name = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Ok((name, text.split_whitespace().collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_csv;

    #[test]
    fn csv_fields_keep_quotes_commas_and_newlines() {
        let rows = parse_csv("\"1\",\"a \"\"b\"\", c\nd \"\n\"-1\",plain\n").unwrap();
        assert_eq!(
            rows,
            vec![
                vec!["1".to_string(), "a \"b\", c\nd ".to_string()],
                vec!["-1".to_string(), "plain".to_string()],
            ]
        );
        assert!(parse_csv("\"open").is_err());
    }
}
