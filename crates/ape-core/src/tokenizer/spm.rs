//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Gemma, Mistral, Llama 2),
//! encoded as llama.cpp encodes them: spaces written as `▁`, the text split into
//! characters, and adjacent pieces merged while their join is a token, the highest
//! scoring join first (the leftmost among equals). A character no token spells becomes
//! its UTF-8 bytes' `<0xNN>` tokens.
//!
//! Special tokens are matched before the merges: user-defined ones always (Gemma's runs of
//! spaces and line breaks), control ones (`<start_of_turn>`) only when asked to, the
//! longest first where two start at the same place.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

use super::TokenKind;
use crate::error::{Error, Result};
use crate::model::gguf::Strings;

/// How SentencePiece writes a space.
const SPACE: char = '\u{2581}';

pub(super) struct Spm {
    tokens: Arc<Strings>,
    /// Every id, ordered by its token's text (then by id): the texts are looked up by
    /// binary search, with no second copy of them in a map.
    by_text: Vec<u32>,
    scores: Vec<f32>,
    /// The `<0xNN>` token of every byte.
    byte_ids: Vec<Option<u32>>,
    add_space_prefix: bool,
    /// Matches control and user-defined token texts, longest first at each place.
    with_control: Specials,
    /// Matches user-defined token texts only.
    plain: Specials,
}

struct Specials {
    matcher: Option<AhoCorasick>,
    ids: Vec<u32>,
}

impl Specials {
    fn new(tokens: &Strings, kinds: &[TokenKind], wanted: &[TokenKind]) -> Result<Specials> {
        let (texts, ids): (Vec<&str>, Vec<u32>) = tokens
            .iter()
            .zip(kinds)
            .enumerate()
            .filter(|(_, (text, kind))| wanted.contains(kind) && !text.is_empty())
            .map(|(id, (text, _))| (text, id as u32))
            .unzip();
        let matcher = match texts.is_empty() {
            true => None,
            false => Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&texts)
                    .map_err(|e| Error::Tokenizer(format!("cannot index special tokens: {e}")))?,
            ),
        };
        Ok(Specials { matcher, ids })
    }
}

impl Spm {
    pub(super) fn new(
        tokens: Arc<Strings>,
        kinds: &[TokenKind],
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
        let mut by_text: Vec<u32> = (0..tokens.len() as u32).collect();
        by_text.sort_by(|&a, &b| {
            tokens
                .get(a as usize)
                .cmp(&tokens.get(b as usize))
                .then(a.cmp(&b))
        });
        let with_control = Specials::new(
            &tokens,
            kinds,
            &[TokenKind::Control, TokenKind::UserDefined],
        )?;
        let plain = Specials::new(&tokens, kinds, &[TokenKind::UserDefined])?;
        let mut spm = Spm {
            tokens,
            by_text,
            byte_ids: Vec::new(),
            scores,
            add_space_prefix,
            with_control,
            plain,
        };
        spm.byte_ids = (0..=255u8)
            .map(|b| spm.id(&format!("<0x{b:02X}>")))
            .collect();
        Ok(spm)
    }

    /// The id of the token spelled `text`: the last where two share one text (as
    /// llama.cpp maps them).
    fn id(&self, text: &str) -> Option<u32> {
        let past = self
            .by_text
            .partition_point(|&id| self.tokens.get(id as usize) <= Some(text));
        let last = *self.by_text.get(past.checked_sub(1)?)?;
        (self.tokens.get(last as usize) == Some(text)).then_some(last)
    }

    /// Token ids of `text`; with `parse_special`, control tokens' text becomes them.
    pub(super) fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let specials = if parse_special {
            &self.with_control
        } else {
            &self.plain
        };
        let mut out = Vec::new();
        let mut at = 0;
        // Whether the next stretch of text follows a special token or the start.
        let mut after_special = true;
        let matches = specials.matcher.iter().flat_map(|m| m.find_iter(text));
        for found in matches {
            self.encode_text(&text[at..found.start()], after_special, &mut out)?;
            out.push(specials.ids[found.pattern().as_usize()]);
            at = found.end();
            after_special = true;
        }
        self.encode_text(&text[at..], after_special, &mut out)?;
        Ok(out)
    }

    /// `text` without special tokens, appended to `out`.
    fn encode_text(&self, text: &str, after_special: bool, out: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let mut escaped = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && after_special {
            escaped.push(SPACE);
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { SPACE } else { c }));
        let mut pieces = Pieces::of(&escaped);
        let mut queue = BinaryHeap::new();
        for left in 0..pieces.len().saturating_sub(1) {
            self.offer(&pieces, left, &mut queue);
        }
        while let Some(join) = queue.pop() {
            let Some(right) = pieces.next[join.left] else {
                continue;
            };
            // Stale: one side has been merged into something else since.
            let (left_len, right_len) = (pieces.len[join.left], pieces.len[right]);
            if left_len == 0 || right_len == 0 || left_len + right_len != join.len {
                continue;
            }
            pieces.merge(join.left, right);
            if let Some(before) = pieces.prev[join.left] {
                self.offer(&pieces, before, &mut queue);
            }
            self.offer(&pieces, join.left, &mut queue);
        }
        let mut at = Some(0);
        while let Some(i) = at {
            let piece = pieces.text(i);
            match self.id(piece) {
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
            at = pieces.next[i];
        }
        Ok(())
    }

    /// Queue the join of piece `left` with the piece after it, if that is a token.
    fn offer(&self, pieces: &Pieces<'_>, left: usize, queue: &mut BinaryHeap<Join>) {
        let Some(right) = pieces.next[left] else {
            return;
        };
        let len = pieces.len[left] + pieces.len[right];
        let joined = &pieces.text[pieces.start[left]..pieces.start[left] + len];
        if let Some(id) = self.id(joined) {
            queue.push(Join {
                score: self.scores[id as usize],
                left,
                len,
            });
        }
    }
}

/// A candidate join: the piece at `left` with the next, `len` bytes together.
struct Join {
    score: f32,
    left: usize,
    len: usize,
}

impl Ord for Join {
    /// The highest score first; among equal scores, the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Join {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Join {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Join {}

/// The pieces of a text as a linked list over its characters: piece `i` starts at the
/// `i`th character and is `len[i]` bytes long (0 once merged into the piece before).
struct Pieces<'a> {
    text: &'a str,
    start: Vec<usize>,
    len: Vec<usize>,
    prev: Vec<Option<usize>>,
    next: Vec<Option<usize>>,
}

impl<'a> Pieces<'a> {
    fn of(text: &'a str) -> Pieces<'a> {
        let start: Vec<usize> = text.char_indices().map(|(at, _)| at).collect();
        let n = start.len();
        let len = (0..n)
            .map(|i| start.get(i + 1).copied().unwrap_or(text.len()) - start[i])
            .collect();
        Pieces {
            text,
            start,
            len,
            prev: (0..n).map(|i| i.checked_sub(1)).collect(),
            next: (0..n).map(|i| Some(i + 1).filter(|&j| j < n)).collect(),
        }
    }

    fn len(&self) -> usize {
        self.start.len()
    }

    fn text(&self, i: usize) -> &'a str {
        &self.text[self.start[i]..self.start[i] + self.len[i]]
    }

    /// Join piece `right` onto piece `left`, which it follows.
    fn merge(&mut self, left: usize, right: usize) {
        self.len[left] += self.len[right];
        self.len[right] = 0;
        self.next[left] = self.next[right];
        if let Some(after) = self.next[right] {
            self.prev[after] = Some(left);
        }
    }
}
