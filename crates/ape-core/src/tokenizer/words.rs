//! Text cut into words before byte-level BPE merges them, as llama.cpp's pre-tokenizer
//! regexes cut it. Each regex is written out by hand as a matcher over character classes
//! (the way llama.cpp runs its common patterns), which needs a table of Unicode general
//! categories rather than a regex engine: no compiled automata in memory, and a word
//! found in one pass over its characters. The tests check every matcher against its
//! regex.
//!
//! A pattern splits text the way `tokenizers`' `Split` with `Isolated` does: each match
//! is a word, and the text between two matches is a word too.

use unicode_general_category::{get_general_category, GeneralCategory as Category};

/// One regex of a pre-tokenizer, as a matcher. A pre-tokenizer applies several in turn,
/// each to the words the one before left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pattern {
    /// GPT-2's `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// Llama 3's `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+` (only ASCII letters case-fold),
    /// with at most `digits` numerals to a word: 3 for Llama 3, 1 for Qwen 2.
    Llama3 { digits: usize },
    /// `\p{N}`: every numeral a word of its own.
    EachNumeral,
    /// `\p{N}+`: runs of numerals.
    Numerals,
    /// `[0-9][0-9][0-9]`: ASCII digits in threes.
    DigitTriples,
    /// `[\p{P}\$\+<=>\^~\|]+`: runs of punctuation and of the ASCII symbols listed.
    Punctuation,
}

/// A character as the patterns see it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// `\p{L}`.
    Letter,
    /// `\p{N}`.
    Numeral,
    /// `\s` (Unicode `White_Space`).
    Space,
    /// `[^\s\p{L}\p{N}]`, split by whether it is `\p{P}`.
    Other { punctuation: bool },
}

fn class(c: char) -> Class {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Numeral,
            // Unicode's `White_Space` within ASCII: tab to carriage return, and space
            // (`char::is_ascii_whitespace` leaves out the vertical tab).
            '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r' | ' ' => Class::Space,
            c => Class::Other {
                punctuation: c.is_ascii_punctuation() && !"$+<=>^`|~".contains(c),
            },
        };
    }
    if c.is_whitespace() {
        return Class::Space;
    }
    match get_general_category(c) {
        Category::UppercaseLetter
        | Category::LowercaseLetter
        | Category::TitlecaseLetter
        | Category::ModifierLetter
        | Category::OtherLetter => Class::Letter,
        Category::DecimalNumber | Category::LetterNumber | Category::OtherNumber => Class::Numeral,
        Category::ConnectorPunctuation
        | Category::DashPunctuation
        | Category::OpenPunctuation
        | Category::ClosePunctuation
        | Category::InitialPunctuation
        | Category::FinalPunctuation
        | Category::OtherPunctuation => Class::Other { punctuation: true },
        _ => Class::Other { punctuation: false },
    }
}

/// The text a pattern runs over, read at byte positions that start characters.
struct Chars<'a> {
    text: &'a str,
}

impl Chars<'_> {
    fn at(&self, i: usize) -> Option<char> {
        self.text[i..].chars().next()
    }

    fn class_at(&self, i: usize) -> Option<Class> {
        self.at(i).map(class)
    }

    /// Past the run of characters from `i` that `keep` accepts.
    fn run(&self, i: usize, keep: impl Fn(char) -> bool) -> usize {
        self.text[i..]
            .char_indices()
            .find(|&(_, c)| !keep(c))
            .map_or(self.text.len(), |(n, _)| i + n)
    }

    /// Past the run of characters of `class` from `i`.
    fn run_of(&self, i: usize, of: fn(Class) -> bool) -> usize {
        self.run(i, |c| of(class(c)))
    }

    /// `i`, or past the space at `i` when one is there: the ` ?` of the patterns.
    fn after_space(&self, i: usize) -> usize {
        i + usize::from(self.text[i..].starts_with(' '))
    }

    /// `\s+(?!\S)` at `i`: a run of spaces that ends the text, or all of a longer run
    /// but its last character, which stays to go with the word after it.
    fn spaces_not_before_word(&self, i: usize) -> Option<usize> {
        let end = self.run_of(i, is_space);
        if end == i {
            return None;
        }
        if end == self.text.len() {
            return Some(end);
        }
        let last = self.text[..end].char_indices().next_back()?.0;
        (last > i).then_some(last)
    }
}

fn is_letter(class: Class) -> bool {
    class == Class::Letter
}

fn is_numeral(class: Class) -> bool {
    class == Class::Numeral
}

fn is_space(class: Class) -> bool {
    class == Class::Space
}

fn is_other(class: Class) -> bool {
    matches!(class, Class::Other { .. })
}

/// Where the contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll` or `'d`) at `i` ends, if
/// one is there; `fold` lets its ASCII letters be of either case.
fn contraction(text: &str, i: usize, fold: bool) -> Option<usize> {
    let rest = text[i..].strip_prefix('\'')?.as_bytes();
    ["s", "t", "re", "ve", "m", "ll", "d"]
        .into_iter()
        .find(|c| {
            rest.get(..c.len()).is_some_and(|start| match fold {
                true => start.eq_ignore_ascii_case(c.as_bytes()),
                false => start == c.as_bytes(),
            })
        })
        .map(|c| i + 1 + c.len())
}

impl Pattern {
    /// Adds the words `text` splits into to `words`.
    pub(super) fn split<'a>(self, text: &'a str, words: &mut Vec<&'a str>) {
        let chars = Chars { text };
        let mut unmatched = 0;
        let mut i = 0;
        while i < text.len() {
            match self.match_at(&chars, i) {
                Some(end) => {
                    if unmatched < i {
                        words.push(&text[unmatched..i]);
                    }
                    words.push(&text[i..end]);
                    (i, unmatched) = (end, end);
                }
                None => i += chars.at(i).map_or(1, char::len_utf8),
            }
        }
        if unmatched < text.len() {
            words.push(&text[unmatched..]);
        }
    }

    /// Where the match starting at `i` ends, if one does. Alternatives are tried in
    /// order and the first that matches counts, as in the regexes.
    fn match_at(self, chars: &Chars<'_>, i: usize) -> Option<usize> {
        let text = chars.text;
        let nonempty = |end: usize, start: usize| (end > start).then_some(end);
        match self {
            Pattern::Gpt2 => {
                if let Some(end) = contraction(text, i, false) {
                    return Some(end);
                }
                let word = chars.after_space(i);
                [is_letter, is_numeral, is_other]
                    .into_iter()
                    .find_map(|of| nonempty(chars.run_of(word, of), word))
                    .or_else(|| chars.spaces_not_before_word(i))
                    .or_else(|| nonempty(chars.run_of(i, is_space), i))
            }
            Pattern::Llama3 { digits } => {
                if let Some(end) = contraction(text, i, true) {
                    return Some(end);
                }
                let first = chars.at(i)?;
                match class(first) {
                    Class::Letter => return Some(chars.run_of(i, is_letter)),
                    Class::Numeral => {
                        return text[i..]
                            .char_indices()
                            .take_while(|&(_, c)| class(c) == Class::Numeral)
                            .take(digits)
                            .last()
                            .map(|(n, c)| i + n + c.len_utf8());
                    }
                    // `[^\r\n\p{L}\p{N}]?\p{L}+`: one character of any other kind may
                    // lead the letters.
                    _ if first != '\r' && first != '\n' => {
                        let next = i + first.len_utf8();
                        if chars.class_at(next) == Some(Class::Letter) {
                            return Some(chars.run_of(next, is_letter));
                        }
                    }
                    _ => {}
                }
                let word = chars.after_space(i);
                let others = chars.run_of(word, is_other);
                if others > word {
                    return Some(chars.run(others, |c| c == '\r' || c == '\n'));
                }
                let spaces = chars.run_of(i, is_space);
                if let Some((n, c)) = text[i..spaces]
                    .char_indices()
                    .rfind(|&(_, c)| c == '\r' || c == '\n')
                {
                    return Some(i + n + c.len_utf8());
                }
                chars
                    .spaces_not_before_word(i)
                    .or_else(|| nonempty(spaces, i))
            }
            Pattern::EachNumeral => chars
                .at(i)
                .filter(|&c| class(c) == Class::Numeral)
                .map(|c| i + c.len_utf8()),
            Pattern::Numerals => nonempty(chars.run_of(i, is_numeral), i),
            Pattern::DigitTriples => {
                let three = text.as_bytes().get(i..i + 3)?;
                three.iter().all(u8::is_ascii_digit).then_some(i + 3)
            }
            Pattern::Punctuation => nonempty(
                chars.run(i, |c| {
                    class(c) == Class::Other { punctuation: true } || "$+<=>^~|".contains(c)
                }),
                i,
            ),
        }
    }
}

/// `text` cut by each pattern in turn, each splitting the words of the one before.
pub(super) fn words<'a>(patterns: &[Pattern], text: &'a str) -> Vec<&'a str> {
    let mut words = vec![text];
    let mut next = Vec::new();
    for pattern in patterns {
        for word in words.drain(..) {
            pattern.split(word, &mut next);
        }
        std::mem::swap(&mut words, &mut next);
    }
    words.retain(|w| !w.is_empty());
    words
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use fancy_regex::Regex;
    use proptest::prelude::*;

    use super::*;

    /// Each pattern beside the regex llama.cpp writes for it.
    static REGEXES: LazyLock<Vec<(Pattern, Regex)>> = LazyLock::new(|| {
        let contractions = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";
        let llama3 = |numerals: &str| {
            format!(
                r"{contractions}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{numerals}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )
        };
        [
            (
                Pattern::Gpt2,
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
                    .to_string(),
            ),
            (Pattern::Llama3 { digits: 3 }, llama3(r"\p{N}{1,3}")),
            (Pattern::Llama3 { digits: 1 }, llama3(r"\p{N}")),
            (Pattern::EachNumeral, r"\p{N}".to_string()),
            (Pattern::Numerals, r"\p{N}+".to_string()),
            (Pattern::DigitTriples, "[0-9][0-9][0-9]".to_string()),
            (Pattern::Punctuation, r"[\p{P}\$\+<=>\^~\|]+".to_string()),
        ]
        .into_iter()
        .map(|(pattern, regex)| (pattern, Regex::new(&regex).unwrap()))
        .collect()
    });

    /// `text` split by `regex`: each match a word, and what lies between matches too.
    fn split_by_regex<'a>(regex: &Regex, text: &'a str) -> Vec<&'a str> {
        let mut words = Vec::new();
        let mut unmatched = 0;
        for found in regex.find_iter(text) {
            let found = found.unwrap();
            if unmatched < found.start() {
                words.push(&text[unmatched..found.start()]);
            }
            words.push(found.as_str());
            unmatched = found.end();
        }
        if unmatched < text.len() {
            words.push(&text[unmatched..]);
        }
        words
    }

    fn split(pattern: Pattern, text: &str) -> Vec<&str> {
        let mut words = Vec::new();
        pattern.split(text, &mut words);
        words
    }

    /// Characters where the patterns' alternatives meet: every class (letters of each
    /// case kind, numerals of each kind, marks, symbols, ASCII and Unicode spaces, line
    /// ends), the letters of the contractions, and the symbols the punctuation pattern
    /// adds.
    const EDGES: &str = "aZéßカ中ǅʰ09٣Ⅻ½² \t\n\r\u{0B}\u{0C}\u{85}\u{A0}\u{3000}\u{2028}'sStTreEvVmMlLdD.,!?$+<=>^~|`_-(\"\u{301}\u{93F}😀\u{1F}\u{0}€";

    fn text() -> impl Strategy<Value = String> {
        let edge: Vec<char> = EDGES.chars().collect();
        let char = prop_oneof![4 => prop::sample::select(edge), 1 => any::<char>()];
        prop::collection::vec(char, 0..24).prop_map(String::from_iter)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn every_pattern_splits_as_its_regex(text in text()) {
            for (pattern, regex) in REGEXES.iter() {
                prop_assert_eq!(
                    split(*pattern, &text),
                    split_by_regex(regex, &text),
                    "{:?} on {:?}", pattern, text
                );
            }
        }
    }

    #[test]
    fn patterns_apply_in_turn() {
        // Alone, GPT-2's pattern keeps " $" and " (" whole; cut by punctuation first, the
        // space before each is left a word of its own.
        let text = "price: $1,234.5 (12345 units) ok";
        assert_eq!(
            words(&[Pattern::Gpt2], text),
            ["price", ":", " $", "1", ",", "234", ".", "5", " (", "12345", " units", ")", " ok"]
        );
        assert_eq!(
            words(&[Pattern::Punctuation, Pattern::Gpt2], text),
            [
                "price", ":", " ", "$", "1", ",", "234", ".", "5", " ", "(", "12345", " units",
                ")", " ok"
            ]
        );
        assert!(words(&[Pattern::Gpt2], "").is_empty());
    }
}
