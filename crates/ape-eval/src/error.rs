use std::path::PathBuf;

/// Everything that can stop an evaluation, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("evaluation data file {path} is missing: run `bash scripts/eval-data.sh` to install the evaluation data, or point --data at the folder that holds it")]
    MissingData { path: PathBuf },
    #[error("cannot read evaluation data {path}: {reason}; run `bash scripts/eval-data.sh` again to reinstall it")]
    BadData { path: PathBuf, reason: String },
    #[error("cannot read task file {path}: {reason}")]
    BadTaskFile { path: PathBuf, reason: String },
    #[error("unknown task `{0}`; choose one of squad, needle, sentiment, intent, or a task file as file:PATH")]
    UnknownTask(String),
    #[error("{0}")]
    Setting(String),
    #[error(transparent)]
    Core(#[from] ape_core::Error),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, EvalError>;
