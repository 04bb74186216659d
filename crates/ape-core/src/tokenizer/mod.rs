//! The model's own tokenizer, rebuilt from the vocabulary stored in its GGUF file.
//!
//! Two kinds of vocabulary are read:
//! - GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`: Llama 3, Qwen 2,
//!   SmolLM), cut into words the way llama.cpp does for the pre-tokenizer named in
//!   `tokenizer.ggml.pre`, then merged by rank (`bpe.rs`);
//! - SentencePiece (`"llama"`: Gemma, Mistral, Llama 2), merged by score (`spm.rs`).
//!
//! Special tokens are matched first and the merge loop is shared (`merge.rs`); the
//! vocabulary is looked up in the file's own token list, so a process holds no second
//! copy of it. Either way prompts get exactly the ids llama.cpp gives them. Decoding is
//! done here, each token's bytes worked out from its text as it is decoded, because
//! streamed generation needs the raw bytes of every token.

mod bpe;
mod merge;
mod spm;
mod words;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::gguf::{Gguf, Strings, Value};

/// Token texts that end generation. llama.cpp finds these by name too, because GGUF
/// files only record one EOS id while chat models stop on several tokens. The FIM pad,
/// repository and file-separator tokens are included because a code model that emits
/// them has finished the file it was asked for; `</s>` and `<eos>` because llama.cpp
/// (the version `llama-cpp-python` 0.3.36 vendors) stops on them in every vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<EOT>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|repo_name|>",
    "<|fim_repo|>",
    "<fim-repo>",
    "<reponame>",
    "<|file_sep|>",
    "</s>",
    "<eos>",
];

/// How a GGUF file classifies a token (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Normal,
    /// Control and unknown tokens: chat markers and the like. Their text only becomes
    /// the token when special tokens are parsed.
    Control,
    /// Added vocabulary that is always matched as a unit, even in plain text.
    UserDefined,
    /// Placeholders with no text (e.g. Qwen's `[PAD151665]`).
    Unused,
    /// `<0xNN>` byte tokens.
    Byte,
}

impl TokenKind {
    fn from_gguf(code: i64) -> Self {
        match code {
            2 | 3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }
}

/// A model's tokenizer: text to token ids and back.
pub struct Tokenizer {
    specials: merge::Specials,
    encoder: Encoder,
    tokens: Arc<Strings>,
    /// How the file classifies each token, which says how its text becomes bytes.
    kinds: Vec<TokenKind>,
    /// Whether texts are in GPT-2's byte alphabet (else SentencePiece's `▁` for a space).
    byte_level: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// Sorted, without duplicates.
    eog: Vec<u32>,
    /// The most bytes of text one token stands for.
    longest_token_bytes: usize,
}

/// Text without special tokens to ids, for one kind of vocabulary.
enum Encoder {
    Bpe(bpe::Bpe),
    Spm(spm::Spm),
}

impl Tokenizer {
    /// The tokenizer the file's `tokenizer.ggml.*` metadata describes; fails on missing or
    /// malformed metadata, a vocabulary other than `gpt2` and `llama`, or a file that wants
    /// BOS but names none.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let model = gguf.require("tokenizer.ggml.model", "string", Value::as_str)?;
        let tokens = Arc::new(string_array(gguf, "tokenizer.ggml.tokens")?.clone());
        let kinds = token_kinds(gguf, &tokens)?;
        let encoder = match model {
            "gpt2" => Encoder::Bpe(bpe::Bpe::new(
                tokens.clone(),
                string_array(gguf, "tokenizer.ggml.merges")?,
                optional(gguf, "tokenizer.ggml.pre", "string", Value::as_str)?,
            )?),
            "llama" => {
                let scores = float_array(gguf, "tokenizer.ggml.scores")?;
                let space_prefix = optional(
                    gguf,
                    "tokenizer.ggml.add_space_prefix",
                    "bool",
                    Value::as_bool,
                )?
                .unwrap_or(true);
                Encoder::Spm(spm::Spm::new(tokens.clone(), scores, space_prefix)?)
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "tokenizer model `{other}` is not supported; ape reads GPT-2 style byte-level BPE (`gpt2`) and SentencePiece (`llama`) vocabularies"
                )))
            }
        };
        let add_bos_by_default = match &encoder {
            Encoder::Bpe(bpe) => bpe.adds_bos(),
            Encoder::Spm(_) => true,
        };
        let bos = special_id(gguf, "tokenizer.ggml.bos_token_id", tokens.len())?;
        let add_bos = optional(gguf, "tokenizer.ggml.add_bos_token", "bool", Value::as_bool)?
            .unwrap_or(add_bos_by_default);
        if add_bos && bos.is_none() {
            return Err(Error::Tokenizer(
                "tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing"
                    .into(),
            ));
        }
        let byte_level = matches!(encoder, Encoder::Bpe(_));
        let mut piece = Vec::new();
        let longest_token_bytes = tokens
            .iter()
            .zip(&kinds)
            .map(|(text, &kind)| {
                piece.clear();
                append_piece(text, kind, byte_level, &mut piece);
                piece.len()
            })
            .max()
            .unwrap_or(0)
            .max(1);
        Ok(Tokenizer {
            specials: merge::Specials::new(&tokens, &kinds)?,
            encoder,
            longest_token_bytes,
            kinds,
            byte_level,
            bos,
            eos: special_id(gguf, "tokenizer.ggml.eos_token_id", tokens.len())?,
            add_bos,
            eog: end_of_generation_ids(gguf, &tokens)?,
            tokens,
        })
    }

    /// Token ids for `text`, without BOS. With `parse_special`, the text of control
    /// tokens (`<|im_start|>`) becomes those tokens; use it for rendered chat templates,
    /// never for raw user input.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        self.specials
            .encode(text, parse_special, |stretch, out| match &self.encoder {
                Encoder::Bpe(bpe) => bpe.encode_text(stretch, out),
                Encoder::Spm(spm) => spm.encode_text(stretch, out),
            })
    }

    /// The fewest tokens `text` can encode to, known without encoding it: no token
    /// stands for more bytes than the vocabulary's longest.
    pub(crate) fn fewest_tokens(&self, text: &str) -> usize {
        text.len().div_ceil(self.longest_token_bytes)
    }

    /// The text of `ids`, control tokens included. Bytes that do not form valid UTF-8
    /// (a character cut off by the end of `ids`) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            self.append_piece(id, &mut bytes)?;
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A decoder for generated tokens, which arrive one at a time.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            pending: Vec::new(),
        }
    }

    /// The beginning-of-sequence token the file names, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The one end-of-sequence token the file names, if any; generation also ends on the
    /// others in [`Tokenizer::eog_ids`].
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether prompts should start with the BOS token.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Tokens in the file's vocabulary: every valid id is below it.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token as the vocabulary spells it (byte-level BPE writes a leading space
    /// as `Ġ`), or `None` for an id outside the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize)
    }

    /// Every token that ends generation: EOS and the end-of-turn tokens of chat models.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` ends generation (is one of [`Tokenizer::eog_ids`]).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Appends the bytes token `id` stands for to `out`.
    fn append_piece(&self, id: u32, out: &mut Vec<u8>) -> Result<()> {
        let (Some(text), Some(&kind)) = (self.tokens.get(id as usize), self.kinds.get(id as usize))
        else {
            return Err(Error::Tokenizer(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.tokens.len()
            )));
        };
        append_piece(text, kind, self.byte_level, out);
        Ok(())
    }
}

/// Turns generated tokens into text as they arrive. A token can end in the middle of a
/// multi-byte character, so bytes are held back until the character is complete.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
}

impl StreamDecoder<'_> {
    /// Adds one token and returns the text that became complete with it, which may be
    /// empty. Bytes that can never be valid UTF-8 come out as U+FFFD.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.append_piece(id, &mut self.pending)?;
        let mut text = String::new();
        let mut done = 0;
        loop {
            match std::str::from_utf8(&self.pending[done..]) {
                Ok(valid) => {
                    text.push_str(valid);
                    done = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid_end = done + e.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending[done..valid_end]));
                    match e.error_len() {
                        Some(invalid) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            done = valid_end + invalid;
                        }
                        // An unfinished character at the end: wait for the next token.
                        None => {
                            done = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..done);
        Ok(text)
    }

    /// Ends the stream, returning what is still held back (an unfinished character
    /// comes out as U+FFFD).
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

/// Appends the bytes a token of `kind` spelled `text` stands for to `out`. Computed on
/// each use rather than held in a table: a table of every token's bytes would double what
/// the vocabulary takes in memory.
fn append_piece(text: &str, kind: TokenKind, byte_level: bool, out: &mut Vec<u8>) {
    match kind {
        TokenKind::Normal | TokenKind::UserDefined if !byte_level => {
            for c in text.chars() {
                match c {
                    '\u{2581}' => out.push(b' '),
                    c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        TokenKind::Normal => {
            for c in text.chars() {
                match byte_of_char(c) {
                    Some(b) => out.push(b),
                    // Not in the byte alphabet, so the vocabulary means the character
                    // itself.
                    None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        TokenKind::Control | TokenKind::UserDefined => out.extend_from_slice(text.as_bytes()),
        TokenKind::Byte => out.extend(parse_byte_token(text)),
        TokenKind::Unused => {}
    }
}

/// The byte a character of GPT-2's byte-level alphabet stands for. Printable bytes
/// stand for themselves; the other 68 (controls, space, DEL, 0x80..=0xA0 and the soft
/// hyphen 0xAD) were moved, in byte order, to U+0100..=U+0143 so that every token is
/// visible text.
fn byte_of_char(c: char) -> Option<u8> {
    let code = u32::from(c);
    let byte = match code {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => code,
        0x100..=0x120 => code - 0x100,
        0x121..=0x142 => code - 0x121 + 0x7F,
        0x143 => 0xAD,
        _ => return None,
    };
    Some(byte as u8)
}

/// The character of GPT-2's byte-level alphabet that stands for `byte`: the inverse of
/// [`byte_of_char`].
fn char_of_byte(byte: u8) -> char {
    BYTE_CHARS[usize::from(byte)]
}

const BYTE_CHARS: [char; 256] = {
    let mut chars = ['\0'; 256];
    let mut byte = 0;
    while byte < 256 {
        let code = match byte as u8 {
            0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => byte,
            0x00..=0x20 => 0x100 + byte,
            0x7F..=0xA0 => 0x121 + byte - 0x7F,
            0xAD => 0x143,
        };
        chars[byte as usize] = match char::from_u32(code) {
            Some(c) => c,
            None => panic!("the byte alphabet lies below U+0144"),
        };
        byte += 1;
    }
    chars
};

/// The byte of a `<0xNN>` token.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// A metadata value that may be absent, but must have the right type if present.
fn optional<'a, T>(
    gguf: &'a Gguf,
    key: &str,
    expected: &'static str,
    get: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<Option<T>> {
    gguf.get(key)
        .map(|value| {
            get(value).ok_or_else(|| Error::Metadata {
                key: key.to_string(),
                expected,
            })
        })
        .transpose()
}

fn special_id(gguf: &Gguf, key: &str, n_vocab: usize) -> Result<Option<u32>> {
    match optional(gguf, key, "token id", Value::as_u64)? {
        Some(id) if id >= n_vocab as u64 => Err(Error::Tokenizer(format!(
            "{key} = {id} is outside the vocabulary of {n_vocab} tokens"
        ))),
        id => Ok(id.map(|id| id as u32)),
    }
}

/// Sorted and without duplicates: the tokens named like end-of-turn markers plus the
/// EOS, EOT and EOM ids the file records.
fn end_of_generation_ids(gguf: &Gguf, tokens: &Strings) -> Result<Vec<u32>> {
    let mut eog: Vec<u32> = tokens
        .iter()
        .enumerate()
        .filter(|(_, text)| EOG_TEXTS.contains(text))
        .map(|(id, _)| id as u32)
        .collect();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        eog.extend(special_id(gguf, key, tokens.len())?);
    }
    eog.sort_unstable();
    eog.dedup();
    Ok(eog)
}

fn float_array(gguf: &Gguf, key: &str) -> Result<Vec<f32>> {
    let numbers = gguf.require(key, "array of numbers", Value::as_numbers)?;
    Ok(numbers.iter().map(|&x| x as f32).collect())
}

fn string_array<'a>(gguf: &'a Gguf, key: &str) -> Result<&'a Strings> {
    gguf.require(key, "array of strings", Value::as_strings)
}

fn token_kinds(gguf: &Gguf, tokens: &Strings) -> Result<Vec<TokenKind>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    const EXPECTED: &str = "array of integers";
    let mut kinds = match optional(gguf, KEY, EXPECTED, Value::as_numbers)? {
        None => vec![TokenKind::Normal; tokens.len()],
        Some(codes) if codes.len() != tokens.len() => {
            return Err(Error::Tokenizer(format!(
                "{KEY} has {} entries for {} tokens",
                codes.len(),
                tokens.len()
            )))
        }
        Some(codes) => codes
            .iter()
            .map(|&code| TokenKind::from_gguf(code as i64))
            .collect(),
    };
    // An end-of-generation token typed as plain text would let user input end the
    // turn; llama.cpp makes such tokens control tokens as well.
    for (kind, text) in kinds.iter_mut().zip(tokens.iter()) {
        if EOG_TEXTS.contains(&text) {
            *kind = TokenKind::Control;
        }
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_covers_every_byte_once() {
        let mut seen = [false; 256];
        for c in (0..0x200).filter_map(char::from_u32) {
            if let Some(b) = byte_of_char(c) {
                assert!(!seen[b as usize], "byte {b:#04x} has two characters");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "some bytes have no character");
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('a'), Some(b'a'));
        for b in 0..=u8::MAX {
            assert_eq!(byte_of_char(char_of_byte(b)), Some(b));
        }
    }

    #[test]
    fn byte_tokens() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(parse_byte_token("<0xff>"), Some(0xFF));
        assert_eq!(parse_byte_token("0x0A"), None);
    }
}
