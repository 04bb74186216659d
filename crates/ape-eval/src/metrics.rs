//! Scores of one prediction: SQuAD-style exact match and token F1 over normalised answers,
//! answer containment, and the distribution measures (log-likelihood, KL divergence) that
//! stay informative when a small model gets few answers right.

/// SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces.
pub(crate) fn normalize_answer(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1 when the normalised prediction equals any normalised gold answer.
pub fn exact_match(prediction: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(prediction);
    f64::from(u8::from(golds.iter().any(|g| normalize_answer(g) == p)))
}

/// The best token-overlap F1 of the prediction against any gold answer.
pub(crate) fn f1(prediction: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(prediction);
    let p: Vec<&str> = p.split_whitespace().collect();
    golds
        .iter()
        .map(|gold| {
            let g = normalize_answer(gold);
            let g: Vec<&str> = g.split_whitespace().collect();
            let mut unmatched = g.clone();
            let mut common = 0usize;
            for word in &p {
                if let Some(i) = unmatched.iter().position(|w| w == word) {
                    unmatched.swap_remove(i);
                    common += 1;
                }
            }
            if common == 0 {
                return 0.0;
            }
            let precision = common as f64 / p.len() as f64;
            let recall = common as f64 / g.len() as f64;
            2.0 * precision * recall / (precision + recall)
        })
        .fold(0.0, f64::max)
}

/// 1 when the normalised prediction contains any non-empty normalised gold answer as
/// whole words (generous to models that answer in a sentence).
pub(crate) fn contains_answer(prediction: &str, golds: &[String]) -> f64 {
    let p = format!(" {} ", normalize_answer(prediction));
    f64::from(u8::from(golds.iter().any(|g| {
        let g = normalize_answer(g);
        !g.is_empty() && p.contains(&format!(" {g} "))
    })))
}

/// Natural-log softmax of `logits`, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&v| v as f64 - log_sum).collect()
}

/// KL(softmax(reference) || softmax(other)) in nats: what is lost by reading `other`'s
/// distribution where `reference`'s is wanted.
pub fn kl_divergence(reference: &[f32], other: &[f32]) -> f64 {
    let (p, q) = (log_softmax(reference), log_softmax(other));
    p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// The log-probability of `tokens` given the logits of each of their rows (row `i` is
/// the distribution `tokens[i]` was drawn from).
pub(crate) fn log_likelihood(rows: &[Vec<f32>], tokens: &[u32]) -> f64 {
    rows.iter()
        .zip(tokens)
        .map(|(row, &t)| log_softmax(row)[t as usize])
        .sum()
}

/// The mean KL divergence over the rows of two teacher-forced runs of the same tokens.
pub fn mean_kl(reference: &[Vec<f32>], other: &[Vec<f32>]) -> f64 {
    let n = reference.len().min(other.len());
    if n == 0 {
        return 0.0;
    }
    reference
        .iter()
        .zip(other)
        .map(|(p, q)| kl_divergence(p, q))
        .sum::<f64>()
        / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golds(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_match_ignores_case_punctuation_and_articles() {
        assert_eq!(
            exact_match("The Denver Broncos.", &golds(&["Denver Broncos"])),
            1.0
        );
        assert_eq!(exact_match("Broncos", &golds(&["Denver Broncos"])), 0.0);
    }

    #[test]
    fn f1_counts_shared_words_once_each() {
        // prediction "denver denver broncos" vs gold "denver broncos": 2 common of 3 / 2.
        let f = f1("Denver denver Broncos", &golds(&["Denver Broncos"]));
        assert!((f - 0.8).abs() < 1e-12, "{f}");
        assert_eq!(f1("Carolina", &golds(&["Denver Broncos", "Broncos"])), 0.0);
        assert_eq!(
            f1("the Broncos", &golds(&["Denver Broncos", "Broncos"])),
            1.0
        );
    }

    #[test]
    fn containment_needs_whole_words() {
        assert_eq!(
            contains_answer("It was 1889, I think.", &golds(&["1889"])),
            1.0
        );
        assert_eq!(contains_answer("18890", &golds(&["1889"])), 0.0);
        assert_eq!(contains_answer("anything", &golds(&["the"])), 0.0);
    }

    #[test]
    fn kl_of_a_distribution_with_itself_is_zero_and_otherwise_positive() {
        let p = [1.0f32, 2.0, 3.0];
        assert_eq!(kl_divergence(&p, &p), 0.0);
        // Adding a constant to every logit does not change the distribution.
        let shifted = [11.0f32, 12.0, 13.0];
        assert!(kl_divergence(&p, &shifted).abs() < 1e-12);
        assert!(kl_divergence(&p, &[3.0, 2.0, 1.0]) > 0.1);
    }

    #[test]
    fn log_likelihood_sums_the_chosen_tokens() {
        let rows = vec![vec![0.0f32, 0.0], vec![0.0, f32::ln(3.0)]];
        let ll = log_likelihood(&rows, &[0, 1]);
        assert!((ll - (0.5f64.ln() + 0.75f64.ln())).abs() < 1e-6, "{ll}");
    }
}
