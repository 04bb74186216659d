//! What the integration tests share: where the test models are.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;

pub(crate) const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";
pub(crate) const QWEN2: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// A base model (no chat template) with local sliding-window layers and a SentencePiece
/// vocabulary.
pub(crate) const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// The path of a test model: `$APE_MODELS_DIR/<file>`, or `models/<file>` in the workspace.
/// A missing model fails the test with the command that installs it.
pub(crate) fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("APE_MODELS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"),
        PathBuf::from,
    );
    let path = dir.join(file);
    assert!(
        path.exists(),
        "model file {} is missing: run `ape model pull` (or `bash scripts/test.sh`) to install the test models, or point APE_MODELS_DIR at them",
        path.display()
    );
    path
}
