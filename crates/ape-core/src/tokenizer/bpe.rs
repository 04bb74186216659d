//! GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`: Llama 3, Qwen 2, SmolLM),
//! encoded as llama.cpp encodes it: the text cut into words by the patterns of the
//! pre-tokenizer `tokenizer.ggml.pre` names (`words.rs`), each word's bytes written in
//! GPT-2's byte alphabet and merged pair by pair, the earliest of `tokenizer.ggml.merges`
//! first.

use std::sync::Arc;

use super::char_of_byte;
use super::merge::{merge, Vocabulary};
use super::words::{words, Pattern};
use crate::error::{Error, Result};
use crate::model::gguf::Strings;

/// How llama.cpp pre-tokenizes for one `tokenizer.ggml.pre` value.
struct PreTokenizer {
    /// Applied one after the other, each splitting the words left by the previous one.
    patterns: &'static [Pattern],
    /// Whole words that are in the vocabulary skip the merges (Llama 3 does this).
    ignore_merges: bool,
    /// Whether a BOS token is prepended when the file does not say.
    add_bos: bool,
}

impl PreTokenizer {
    const DEFAULT: PreTokenizer = PreTokenizer {
        patterns: &[
            Pattern::Punctuation,
            Pattern::Gpt2,
            Pattern::Numerals,
            Pattern::DigitTriples,
        ],
        ignore_merges: false,
        add_bos: false,
    };

    fn named(name: &str) -> Result<Self> {
        const LLAMA3: &[Pattern] = &[Pattern::Llama3 { digits: 3 }];
        let (patterns, ignore_merges, add_bos): (&'static [Pattern], _, _) = match name {
            "default" => return Ok(Self::DEFAULT),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => (LLAMA3, true, true),
            "dbrx" | "smaug-bpe" => (LLAMA3, false, false),
            "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" => {
                (&[Pattern::Llama3 { digits: 1 }], false, false)
            }
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => (&[Pattern::EachNumeral, Pattern::Gpt2], false, false),
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "roberta-bpe" => {
                (&[Pattern::Gpt2], false, false)
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "unknown pre-tokenizer `{other}` in tokenizer.ggml.pre; ape knows llama3/llama-bpe, qwen2, smollm, gpt2 and their aliases"
                )))
            }
        };
        Ok(PreTokenizer {
            patterns,
            ignore_merges,
            add_bos,
        })
    }
}

pub(super) struct Bpe {
    vocabulary: Vocabulary,
    ranks: Ranks,
    patterns: &'static [Pattern],
    ignore_merges: bool,
    add_bos: bool,
}

impl Bpe {
    /// `pre` is `tokenizer.ggml.pre`, if the file names one.
    pub(super) fn new(tokens: Arc<Strings>, merges: &Strings, pre: Option<&str>) -> Result<Bpe> {
        let pre = match pre {
            None => PreTokenizer::DEFAULT,
            Some(name) => PreTokenizer::named(name)?,
        };
        let vocabulary = Vocabulary::new(tokens);
        if let Some((text, first, second)) = vocabulary.duplicate() {
            return Err(Error::Tokenizer(format!(
                "the vocabulary lists `{text}` twice (ids {first} and {second})"
            )));
        }
        let mut ranks = Ranks::new(vocabulary.len());
        for (rank, merge) in merges.iter().enumerate() {
            let id = |text: &str| {
                vocabulary.id(text).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "BPE merge `{merge}` (number {rank}) names `{text}`, which is not in the vocabulary"
                    ))
                })
            };
            let Some((left, right)) = merge.split_once(' ') else {
                return Err(Error::Tokenizer(format!(
                    "BPE merge `{merge}` is not two tokens separated by a space"
                )));
            };
            let made = id(&[left, right].concat())?;
            ranks.add(made, left.len(), (id(left)?, id(right)?), rank as u32);
        }
        ranks.others.sort_by_key(|&(sides, _)| sides);
        // The first of two equal merges counts, as in llama.cpp: the sort is stable and
        // keeps them in rank order, and `dedup_by_key` keeps the first.
        ranks.others.dedup_by_key(|&mut (sides, _)| sides);
        Ok(Bpe {
            vocabulary,
            ranks,
            patterns: pre.patterns,
            ignore_merges: pre.ignore_merges,
            add_bos: pre.add_bos,
        })
    }

    /// Whether prompts start with BOS when the file does not say.
    pub(super) fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// `text`, which holds no special tokens, appended to `out`.
    pub(super) fn encode_text(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let id = |text: &str| self.vocabulary.id(text);
        // Earlier merges first: the rank, negated, is the priority.
        let rank = |joined: &str, left_len: usize| {
            let rank = self.ranks.of(&self.vocabulary, joined, left_len)?;
            Some(-(rank as f32))
        };
        let mut spelled = String::new();
        for word in words(self.patterns, text) {
            spelled.clear();
            spelled.extend(word.bytes().map(char_of_byte));
            if let Some(whole) = id(&spelled).filter(|_| self.ignore_merges) {
                out.push(whole);
                continue;
            }
            for piece in merge(&spelled, rank) {
                out.push(id(piece).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "the byte-level vocabulary has no token for `{piece}`; the model file's vocabulary is incomplete"
                    ))
                })?);
            }
        }
        Ok(())
    }
}

/// The rank of every merge (its place in the list), found from the token it makes: a
/// pair of symbols can only join as a merge if their text together is a token. Held per
/// token, as the rank of the first merge making it and where that merge splits its text
/// (six bytes a token, half a sorted list of the merges by their sides); the few merges
/// making a token that an earlier merge makes split elsewhere are kept by their sides.
struct Ranks {
    /// Per token, the rank of the first merge making it; `NONE` where no merge does.
    first: Vec<u32>,
    /// Per token, the length of that merge's left side in bytes.
    split: Vec<u16>,
    /// ((left id, right id), rank) of the other merges, sorted by their sides.
    others: Vec<((u32, u32), u32)>,
}

impl Ranks {
    const NONE: u32 = u32::MAX;

    fn new(tokens: usize) -> Ranks {
        Ranks {
            first: vec![Ranks::NONE; tokens],
            split: vec![0; tokens],
            others: Vec::new(),
        }
    }

    /// Adds merge number `rank`, of the tokens `sides`, making token `made` with a left
    /// side of `left_len` bytes.
    fn add(&mut self, made: u32, left_len: usize, sides: (u32, u32), rank: u32) {
        let made = made as usize;
        match u16::try_from(left_len) {
            Ok(split) if self.first[made] == Ranks::NONE => {
                self.first[made] = rank;
                self.split[made] = split;
            }
            Ok(split) if self.split[made] == split => {}
            _ => self.others.push((sides, rank)),
        }
    }

    /// The rank of the merge joining `joined[..left_len]` and `joined[left_len..]`, if
    /// there is one.
    fn of(&self, vocabulary: &Vocabulary, joined: &str, left_len: usize) -> Option<u32> {
        let made = vocabulary.id(joined)? as usize;
        let first = self.first[made];
        if first != Ranks::NONE && usize::from(self.split[made]) == left_len {
            return Some(first);
        }
        if self.others.is_empty() {
            return None;
        }
        let sides = (
            vocabulary.id(&joined[..left_len])?,
            vocabulary.id(&joined[left_len..])?,
        );
        let at = self
            .others
            .binary_search_by_key(&sides, |&(sides, _)| sides)
            .ok()?;
        Some(self.others[at].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words `pre` cuts `text` into, in the byte-level alphabet (`Ġ` is a space).
    fn split(pre: &PreTokenizer, text: &str) -> Vec<String> {
        words(pre.patterns, text)
            .into_iter()
            .map(|word| word.bytes().map(char_of_byte).collect())
            .collect()
    }

    #[test]
    fn pre_tokenizers_are_known_by_their_names() {
        for name in [
            "default",
            "llama3",
            "llama-bpe",
            "dbrx",
            "qwen2",
            "stablelm2",
            "smollm",
            "starcoder",
            "gpt2",
            "gpt-2",
        ] {
            assert!(PreTokenizer::named(name).is_ok(), "{name}");
        }
        let err = PreTokenizer::named("nonesuch").err().unwrap().to_string();
        assert!(err.contains("unknown pre-tokenizer `nonesuch`"), "{err}");
    }

    #[test]
    fn digits_are_grouped_as_llama_cpp_groups_them() {
        let named = |name| PreTokenizer::named(name).unwrap();
        assert_eq!(
            split(&named("llama3"), "Hello 12345 world's"),
            ["Hello", "Ġ", "123", "45", "Ġworld", "'s"]
        );
        assert_eq!(split(&named("qwen2"), "x 42"), ["x", "Ġ", "4", "2"]);
        assert_eq!(split(&named("smollm"), "x 42"), ["x", "Ġ", "4", "2"]);
        assert_eq!(split(&named("gpt2"), "x 42"), ["x", "Ġ42"]);
        assert_eq!(split(&PreTokenizer::DEFAULT, "1234"), ["123", "4"]);
    }

    fn tiny(tokens: &[&str], merges: &[&str]) -> Result<Bpe> {
        let tokens = Arc::new(tokens.iter().copied().collect::<Strings>());
        Bpe::new(tokens, &merges.iter().copied().collect(), Some("gpt2"))
    }

    #[test]
    fn earlier_merges_join_first_and_the_leftmost_among_equals() {
        // "aaa": the rank-0 merge `a a` joins the first two, then nothing joins `aa a`;
        // "abc": `b c` ranks before `a b`, so the word ends as `a` + `bc`.
        let bpe = tiny(&["a", "b", "c", "aa", "ab", "bc"], &["b c", "a a", "a b"]).unwrap();
        let mut ids = Vec::new();
        bpe.encode_text("aaa", &mut ids).unwrap();
        assert_eq!(ids, [3, 0]);
        ids.clear();
        bpe.encode_text("abc", &mut ids).unwrap();
        assert_eq!(ids, [0, 5]);
    }

    #[test]
    fn a_token_two_merges_make_joins_by_either() {
        // `abc` is made by `a bc` (rank 2) and by `ab c` (rank 3). In "abc", `a b` joins
        // first, so only the later merge can finish the word; in "xbc" nothing but the
        // earlier one applies. The repeated `a b` (rank 4) changes nothing.
        let tokens = ["a", "b", "c", "x", "ab", "bc", "abc", "xbc"];
        let merges = ["a b", "b c", "a bc", "ab c", "a b", "x bc"];
        let bpe = tiny(&tokens, &merges).unwrap();
        let mut ids = Vec::new();
        bpe.encode_text("abc", &mut ids).unwrap();
        assert_eq!(ids, [6]);
        ids.clear();
        bpe.encode_text("xbc", &mut ids).unwrap();
        assert_eq!(ids, [7]);
        ids.clear();
        bpe.encode_text("ab", &mut ids).unwrap();
        assert_eq!(ids, [4]);
    }

    #[test]
    fn a_broken_merge_list_is_refused_with_the_merge_named() {
        let missing = tiny(&["a", "b"], &["a b"]).err().unwrap().to_string();
        assert!(
            missing.contains("`a b`") && missing.contains("`ab`"),
            "{missing}"
        );
        let malformed = tiny(&["a", "b", "ab"], &["ab"]).err().unwrap().to_string();
        assert!(malformed.contains("not two tokens"), "{malformed}");
        let twice = tiny(&["a", "a"], &[]).err().unwrap().to_string();
        assert!(twice.contains("twice"), "{twice}");
    }

    #[test]
    fn a_character_the_vocabulary_lacks_is_an_error() {
        let bpe = tiny(&["a"], &[]).unwrap();
        let err = bpe
            .encode_text("ab", &mut Vec::new())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no token for `b`"), "{err}");
    }
}
