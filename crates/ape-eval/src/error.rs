use std::path::PathBuf;

/// Everything that can stop an evaluation, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or folder that `scripts/eval-data.sh` installs is not in the data folder.
    #[error("evaluation data file {path} is missing: run `bash scripts/eval-data.sh` to install the evaluation data, or point --data at the folder that holds it")]
    MissingData {
        /// Where the file or folder was looked for.
        path: PathBuf,
    },
    /// An installed data file exists but cannot be read or parsed.
    #[error("cannot read evaluation data {path}: {reason}; run `bash scripts/eval-data.sh` again to reinstall it")]
    BadData {
        /// The file (or folder) that failed.
        path: PathBuf,
        /// What was wrong with it: the I/O or parse error.
        reason: String,
    },
    /// A hand-written task (`file:PATH`) cannot be read or parsed, or an example in it is
    /// malformed (neither answers nor labels, a gold index outside its labels, answer and
    /// choice examples mixed).
    #[error("cannot read task file {path}: {reason}")]
    BadTaskFile {
        /// The task file given after `file:`.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A task name that is none of the built-in tasks nor `file:PATH`; holds the name.
    #[error("unknown task `{0}`; choose one of squad, needle, sentiment, intent, or a task file as file:PATH")]
    UnknownTask(String),
    /// A run asked for something the task cannot give (a bad split name, too many
    /// contexts or questions, an option the task does not take); holds the full message.
    #[error("{0}")]
    Setting(String),
    /// The engine failed (loading, tokenizing, reading or generating).
    #[error(transparent)]
    Core(#[from] ape_core::Error),
    /// A report file (JSON or SVG) cannot be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file that was being written.
        path: PathBuf,
        /// The I/O or serialisation error.
        reason: String,
    },
}

/// The result of every fallible call of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;
