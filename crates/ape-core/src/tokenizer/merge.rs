//! What both kinds of vocabulary share: finding a token by its text, matching special
//! tokens in the text before anything else, and the merge loop (a word starts as its
//! characters, and the adjacent pair with the highest priority is joined until no pair
//! may join, the leftmost among equals). SentencePiece's priority is the joined token's
//! score, byte-level BPE's the merge's rank (earlier first).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

use super::TokenKind;
use crate::error::{Error, Result};
use crate::model::gguf::Strings;

/// The token texts, looked up by binary search over the ids ordered by text: no second
/// copy of the texts is kept in a map.
pub(super) struct Vocabulary {
    tokens: Arc<Strings>,
    by_text: Vec<u32>,
}

impl Vocabulary {
    pub(super) fn new(tokens: Arc<Strings>) -> Vocabulary {
        let mut by_text: Vec<u32> = (0..tokens.len() as u32).collect();
        by_text.sort_by(|&a, &b| {
            tokens
                .get(a as usize)
                .cmp(&tokens.get(b as usize))
                .then(a.cmp(&b))
        });
        Vocabulary { tokens, by_text }
    }

    /// Tokens in the vocabulary.
    pub(super) fn len(&self) -> usize {
        self.by_text.len()
    }

    /// The id of the token spelled `text`: the last where two share one text (as
    /// llama.cpp maps them).
    pub(super) fn id(&self, text: &str) -> Option<u32> {
        let past = self
            .by_text
            .partition_point(|&id| self.tokens.get(id as usize) <= Some(text));
        let last = *self.by_text.get(past.checked_sub(1)?)?;
        (self.tokens.get(last as usize) == Some(text)).then_some(last)
    }

    /// A text two ids share, and the two ids, if the vocabulary has one.
    pub(super) fn duplicate(&self) -> Option<(&str, u32, u32)> {
        self.by_text.windows(2).find_map(|pair| {
            let text = self.tokens.get(pair[0] as usize)?;
            (self.tokens.get(pair[1] as usize) == Some(text)).then_some((text, pair[0], pair[1]))
        })
    }
}

/// Special tokens, matched in the text before it is split into words: user-defined ones
/// always (Gemma's runs of spaces and line breaks), control ones (`<|im_start|>`) only
/// when asked to, the longest first where two start at the same place.
pub(super) struct Specials {
    with_control: Matcher,
    plain: Matcher,
}

struct Matcher {
    texts: Option<AhoCorasick>,
    ids: Vec<u32>,
}

impl Specials {
    pub(super) fn new(tokens: &Strings, kinds: &[TokenKind]) -> Result<Specials> {
        Ok(Specials {
            with_control: Matcher::new(
                tokens,
                kinds,
                &[TokenKind::Control, TokenKind::UserDefined],
            )?,
            plain: Matcher::new(tokens, kinds, &[TokenKind::UserDefined])?,
        })
    }

    /// The ids of `text`: special tokens found in it, and between them what
    /// `encode_text(stretch, out)` makes of the text (every stretch follows the start or
    /// a special token).
    pub(super) fn encode(
        &self,
        text: &str,
        parse_special: bool,
        mut encode_text: impl FnMut(&str, &mut Vec<u32>) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let matcher = match parse_special {
            true => &self.with_control,
            false => &self.plain,
        };
        let mut out = Vec::new();
        let mut at = 0;
        for found in matcher.texts.iter().flat_map(|m| m.find_iter(text)) {
            if found.start() > at {
                encode_text(&text[at..found.start()], &mut out)?;
            }
            out.push(matcher.ids[found.pattern().as_usize()]);
            at = found.end();
        }
        if at < text.len() {
            encode_text(&text[at..], &mut out)?;
        }
        Ok(out)
    }
}

impl Matcher {
    fn new(tokens: &Strings, kinds: &[TokenKind], wanted: &[TokenKind]) -> Result<Matcher> {
        let (texts, ids): (Vec<&str>, Vec<u32>) = tokens
            .iter()
            .zip(kinds)
            .enumerate()
            .filter(|(_, (text, kind))| wanted.contains(kind) && !text.is_empty())
            .map(|(id, (text, _))| (text, id as u32))
            .unzip();
        let texts = match texts.is_empty() {
            true => None,
            false => Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&texts)
                    .map_err(|e| Error::Tokenizer(format!("cannot index special tokens: {e}")))?,
            ),
        };
        Ok(Matcher { texts, ids })
    }
}

/// `text` split into its characters, then merged: while some adjacent pair has a
/// priority (`priority(joined, left_len)`, higher first; `joined[..left_len]` is the
/// left symbol), the best pair is joined.
pub(super) fn merge<'a>(
    text: &'a str,
    priority: impl Fn(&str, usize) -> Option<f32>,
) -> impl Iterator<Item = &'a str> {
    let mut symbols = Symbols::of(text);
    let offer = |symbols: &Symbols<'a>, left: usize, queue: &mut BinaryHeap<Join>| {
        let Some(right) = symbols.next[left] else {
            return;
        };
        let len = symbols.len[left] + symbols.len[right];
        let start = symbols.start[left];
        if let Some(priority) = priority(&text[start..start + len], symbols.len[left]) {
            queue.push(Join {
                priority,
                left,
                len,
            });
        }
    };
    let mut queue = BinaryHeap::new();
    for left in 0..symbols.start.len().saturating_sub(1) {
        offer(&symbols, left, &mut queue);
    }
    while let Some(join) = queue.pop() {
        let Some(right) = symbols.next[join.left] else {
            continue;
        };
        // Symbols only grow, so a join whose sides have changed since it was offered
        // no longer adds up to its length.
        let (left_len, right_len) = (symbols.len[join.left], symbols.len[right]);
        if left_len == 0 || right_len == 0 || left_len + right_len != join.len {
            continue;
        }
        symbols.join(join.left, right);
        if let Some(before) = symbols.prev[join.left] {
            offer(&symbols, before, &mut queue);
        }
        offer(&symbols, join.left, &mut queue);
    }
    let mut at = (!text.is_empty()).then_some(0);
    std::iter::from_fn(move || {
        let i = at?;
        at = symbols.next[i];
        Some(symbols.text(i))
    })
}

/// A candidate join: the symbol at `left` with the next, `len` bytes together.
struct Join {
    priority: f32,
    left: usize,
    len: usize,
}

impl Ord for Join {
    /// The highest priority first; among equals, the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .total_cmp(&other.priority)
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

/// The symbols of a text as a linked list over its characters: symbol `i` starts at the
/// `i`th character and is `len[i]` bytes long (0 once joined onto the symbol before).
struct Symbols<'a> {
    text: &'a str,
    start: Vec<usize>,
    len: Vec<usize>,
    prev: Vec<Option<usize>>,
    next: Vec<Option<usize>>,
}

impl<'a> Symbols<'a> {
    fn of(text: &'a str) -> Symbols<'a> {
        let start: Vec<usize> = text.char_indices().map(|(at, _)| at).collect();
        let n = start.len();
        let len = (0..n)
            .map(|i| start.get(i + 1).copied().unwrap_or(text.len()) - start[i])
            .collect();
        Symbols {
            text,
            start,
            len,
            prev: (0..n).map(|i| i.checked_sub(1)).collect(),
            next: (0..n).map(|i| Some(i + 1).filter(|&j| j < n)).collect(),
        }
    }

    fn text(&self, i: usize) -> &'a str {
        &self.text[self.start[i]..self.start[i] + self.len[i]]
    }

    /// Join symbol `right` onto symbol `left`, which it follows.
    fn join(&mut self, left: usize, right: usize) {
        self.len[left] += self.len[right];
        self.len[right] = 0;
        self.next[left] = self.next[right];
        if let Some(after) = self.next[right] {
            self.prev[after] = Some(left);
        }
    }
}
