//! ape-eval: how much accuracy parallel encoding and APE keep against sequential reading,
//! measured on real RAG and in-context-learning data with the real models.
//!
//! A run loads a task's examples (`tasks`, from the files `scripts/eval-data.sh` installs,
//! read by `data`), reads each in every setting through the one engine the CLI and server
//! use (`run`, sharing encoded contexts through `store`), scores the predictions
//! (`metrics`) and reports them (`report`): every prediction as JSON, summaries as
//! Markdown, the metric against the number of contexts as SVG.
//!
//! Besides the task's own metric, every setting is measured against sequential reading on
//! the gold answer's tokens, teacher-forced: the mean KL divergence of the next-token
//! distributions and the gold answer's log-likelihood. These stay informative for models
//! too small to get many answers right.

#![warn(missing_docs)]

mod data;
mod error;
pub mod metrics;
pub mod report;
pub mod run;
pub mod store;
pub mod tasks;

pub use error::{EvalError, Result};
pub use report::Report;
pub use run::{Evaluator, Setting};
pub use tasks::{Draw, Split, Task};
