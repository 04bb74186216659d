//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Gemma, Mistral, Llama 2),
//! encoded as llama.cpp encodes them: spaces written as `▁`, the text split into
//! characters, and adjacent pieces merged while their join is a token, the highest
//! scoring join first (the leftmost among equals). A character no token spells becomes
//! its UTF-8 bytes' `<0xNN>` tokens.

use std::sync::Arc;

use super::merge::{merge, Vocabulary};
use crate::error::{Error, Result};
use crate::model::gguf::Strings;

/// How SentencePiece writes a space.
const SPACE: char = '\u{2581}';

pub(super) struct Spm {
    vocabulary: Vocabulary,
    scores: Vec<f32>,
    /// The `<0xNN>` token of every byte.
    byte_ids: Vec<Option<u32>>,
    add_space_prefix: bool,
}

impl Spm {
    pub(super) fn new(
        tokens: Arc<Strings>,
        scores: Vec<f32>,
        add_space_prefix: bool,
    ) -> Result<Spm> {
        if scores.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "tokenizer.ggml.scores has {} entries for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        let vocabulary = Vocabulary::new(tokens);
        let byte_ids = (0..=255u8)
            .map(|b| vocabulary.id(&format!("<0x{b:02X}>")))
            .collect();
        Ok(Spm {
            vocabulary,
            scores,
            byte_ids,
            add_space_prefix,
        })
    }

    /// `text`, which holds no special tokens and follows the start or one, appended to
    /// `out`.
    pub(super) fn encode_text(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut escaped = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            escaped.push(SPACE);
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { SPACE } else { c }));
        let score = |joined: &str, _| Some(self.scores[self.vocabulary.id(joined)? as usize]);
        for piece in merge(&escaped, score) {
            match self.vocabulary.id(piece) {
                Some(id) => out.push(id),
                None => {
                    for byte in piece.bytes() {
                        let id = self.byte_ids[byte as usize].ok_or_else(|| {
                            Error::Tokenizer(format!(
                                "the vocabulary has no token for byte {byte:#04x} (`<0x{byte:02X}>`)"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
        }
        Ok(())
    }
}
