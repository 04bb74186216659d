//! How a request's contexts are read: the modes, APE's factors, the recompute share and
//! selection, and the defaults a calibration chooses.

use crate::attention::ApeFactors;
use crate::error::{Error, Result};

/// APE's temperature when none is given (the paper's default).
pub const DEFAULT_APE_TEMPERATURE: f32 = 0.9;
/// APE's scaling factor when none is given (the paper's default).
pub const DEFAULT_APE_SCALE: f32 = 0.9;

/// The values APE's temperature and scale may take: beyond them attention over the
/// contexts is all but uniform or all but one token, and answers are noise.
pub(super) const APE_FACTOR_RANGE: std::ops::RangeInclusive<f32> = 0.05..=4.0;

/// How the contexts of a request are read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// One causal pass over prefix, contexts and query.
    Sequential,
    /// Contexts encoded independently, plain attention over them (T = S = 1).
    Parallel,
    /// Contexts encoded independently, APE attention with the given factors, after a
    /// share of the context tokens is recomputed (see [`Recompute`]).
    Ape {
        /// Temperature and scale of the query's attention over the contexts.
        factors: ApeFactors,
        /// Which context tokens are recomputed before the query reads them.
        recompute: Recompute,
    },
}

impl Mode {
    /// APE with temperature `temperature` and scale `scale`, both finite and positive,
    /// and nothing recomputed.
    pub fn ape(temperature: f32, scale: f32) -> Result<Mode> {
        for (name, value) in [("temperature", temperature), ("scale", scale)] {
            if !APE_FACTOR_RANGE.contains(&value) {
                return Err(Error::ApeSetting(format!(
                    "the APE {name} must be between {} and {}, got {value} (the paper uses \
                     0.5 to 1)",
                    APE_FACTOR_RANGE.start(),
                    APE_FACTOR_RANGE.end()
                )));
            }
        }
        Ok(Mode::Ape {
            factors: ApeFactors { temperature, scale },
            recompute: Recompute::NONE,
        })
    }

    /// The mode called `name` (`sequential`, `parallel` or `ape`); the factors are used
    /// by `ape` only.
    pub fn from_name(name: &str, temperature: f32, scale: f32) -> Result<Mode> {
        match name {
            "sequential" => Ok(Mode::Sequential),
            "parallel" => Ok(Mode::Parallel),
            "ape" => Mode::ape(temperature, scale),
            other => Err(Error::UnknownMode(other.to_string())),
        }
    }

    /// This mode with `recompute`; only `ape` recomputes (for plain parallel encoding
    /// with recomputation, ask for `ape` with both factors 1).
    pub fn with_recompute(self, recompute: Recompute) -> Result<Mode> {
        match self {
            Mode::Ape { factors, .. } => Ok(Mode::Ape { factors, recompute }),
            _ if recompute.share == 0.0 => Ok(self),
            other => Err(Error::ApeSetting(format!(
                "recomputing context tokens applies to mode ape, not {}; for plain parallel \
                 encoding with recomputation ask for ape with temperature 1 and scale 1",
                other.name()
            ))),
        }
    }

    /// The name [`Mode::from_name`] reads back; it leaves out the factors.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Sequential => "sequential",
            Mode::Parallel => "parallel",
            Mode::Ape { .. } => "ape",
        }
    }

    /// The factors of the parallel modes; `None` for sequential.
    pub fn factors(&self) -> Option<ApeFactors> {
        match *self {
            Mode::Sequential => None,
            Mode::Parallel => Some(ApeFactors {
                temperature: 1.0,
                scale: 1.0,
            }),
            Mode::Ape { factors, .. } => Some(factors),
        }
    }

    /// The share of context tokens this mode recomputes.
    pub fn recompute(&self) -> Recompute {
        match *self {
            Mode::Ape { recompute, .. } => recompute,
            _ => Recompute::NONE,
        }
    }
}

/// Which context tokens APE recomputes before the query reads them, and how many.
///
/// Parallel encoding leaves every context token with keys and values computed as if no
/// other context existed. Recomputing a share of them repairs that: the contexts are laid
/// out one after another after the prefix, at the positions sequential reading gives them
/// (each key rotated to its new position), and the chosen tokens are run through the
/// model again, layer by layer, attending to the prefix and to every earlier context
/// token (the other chosen ones with their new keys and values). The first context needs
/// none of that (it sees only the prefix in sequential reading too), so the share, counted
/// over all context tokens, is spent on the others. The query then reads the contexts so
/// laid out as one, with APE's temperature and scale moved towards 1 by the share (see
/// `Repaired::factors`). Recomputing every token is sequential reading; recomputing none
/// is APE as it is, at reused positions.
///
/// Laying the contexts out in order needs the prefix, every context, the query and the
/// answer's token limit to fit the window together: a request for which they do not is
/// read with APE alone, and reports no recomputed token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recompute {
    /// Share of the context tokens recomputed, from 0 to 1.
    pub share: f32,
    /// How those tokens are chosen; nothing to choose at share 0.
    pub selection: Selection,
}

/// How the tokens to recompute are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// The first tokens of every context after the first (EPIC's choice): the same share
    /// of each one's tokens, from its start.
    First,
    /// The tokens of the contexts after the first that the query attends to most, when it
    /// reads the contexts in order without recomputation: the weights of its last token,
    /// summed over heads and the later half of the layers. Ties go to the earlier token.
    Attended,
}

impl Selection {
    /// The selection a command line or request names: `first` or `attended`.
    pub fn from_name(name: &str) -> Result<Selection> {
        match name {
            "first" => Ok(Selection::First),
            "attended" => Ok(Selection::Attended),
            other => Err(Error::ApeSetting(format!(
                "unknown recompute selection `{other}`; choose first or attended"
            ))),
        }
    }

    /// The name [`Selection::from_name`] reads back.
    pub fn name(self) -> &'static str {
        match self {
            Selection::First => "first",
            Selection::Attended => "attended",
        }
    }
}

impl Recompute {
    /// Nothing recomputed: APE as the paper defines it.
    pub(crate) const NONE: Recompute = Recompute {
        share: 0.0,
        selection: Selection::Attended,
    };

    /// Recompute `share` (0 to 1) of the context tokens, chosen by `selection`.
    pub fn new(share: f32, selection: Selection) -> Result<Recompute> {
        if !(0.0..=1.0).contains(&share) {
            return Err(Error::ApeSetting(format!(
                "the share of context tokens to recompute must be between 0 and 1, got {share}"
            )));
        }
        Ok(Recompute { share, selection })
    }
}

/// What a request over contexts looks like, for defaults chosen apart per shape: APE's
/// best factors differ between a few long documents and many short demonstrations (on
/// Qwen2.5-Coder-0.5B, T = S = 1 for the first, T 0.3 and S 0.6 for the second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A few documents (RAG).
    Documents,
    /// Many short contexts: the demonstrations of in-context learning.
    ManyShot,
}

/// A request is many-shot from this many contexts on...
pub(super) const MANY_SHOT_CONTEXTS: usize = 8;
/// ...averaging at most this many tokens.
pub(super) const MANY_SHOT_TOKENS: usize = 64;

impl Shape {
    /// The shape of a request with these contexts.
    pub fn of(contexts: &[Vec<u32>]) -> Shape {
        let tokens: usize = contexts.iter().map(Vec::len).sum();
        if contexts.len() >= MANY_SHOT_CONTEXTS && tokens <= MANY_SHOT_TOKENS * contexts.len() {
            Shape::ManyShot
        } else {
            Shape::Documents
        }
    }
}

/// APE's settings where a request names none: the paper's factors and no recomputation,
/// or what `ape calibrate` chose for the model (for many-shot requests apart, where it
/// chose for them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ApeDefaults {
    /// The settings for [`Shape::Documents`] requests, and for many-shot ones when
    /// calibration chose none apart.
    pub documents: ShapeDefaults,
    /// The settings for [`Shape::ManyShot`] requests, where calibration chose them apart.
    pub many_shot: Option<ShapeDefaults>,
}

/// The settings chosen for one shape of request.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeDefaults {
    /// The factors at the default share.
    pub factors: ApeFactors,
    /// The default share and selection.
    pub recompute: Recompute,
    /// The best factors calibration found at each share it tried (share, factors): the
    /// factors that read closest to sequential move with the share (on SmolLM2, T 0.9
    /// with nothing recomputed, T 1 at 5%).
    pub by_share: Vec<(f32, ApeFactors)>,
}

impl Default for ShapeDefaults {
    fn default() -> Self {
        ShapeDefaults {
            factors: ApeFactors {
                temperature: DEFAULT_APE_TEMPERATURE,
                scale: DEFAULT_APE_SCALE,
            },
            recompute: Recompute::NONE,
            by_share: Vec::new(),
        }
    }
}

impl ShapeDefaults {
    /// The factors for a request recomputing `share`: those calibrated at the nearest
    /// share tried (the smaller of two as near), else the default share's.
    pub fn factors_at(&self, share: f32) -> ApeFactors {
        let distance = |s: f32| (s - share).abs();
        self.by_share
            .iter()
            .min_by(|a, b| {
                distance(a.0)
                    .total_cmp(&distance(b.0))
                    .then(a.0.total_cmp(&b.0))
            })
            .map_or(self.factors, |&(_, factors)| factors)
    }
}

impl ApeDefaults {
    /// The settings for a request of `shape`.
    pub fn for_shape(&self, shape: Shape) -> &ShapeDefaults {
        match (shape, &self.many_shot) {
            (Shape::ManyShot, Some(chosen)) => chosen,
            _ => &self.documents,
        }
    }

    /// The mode a request over `contexts` asks for by name (`ape` when `None`), each
    /// setting it leaves out taken from the defaults for its shape (the factors from
    /// those calibrated at the share it recomputes): how `ape generate` and the server
    /// turn a request's APE fields into a mode.
    pub fn mode(
        &self,
        contexts: &[Vec<u32>],
        name: Option<&str>,
        temperature: Option<f32>,
        scale: Option<f32>,
        recompute: Option<f32>,
    ) -> Result<Mode> {
        let defaults = self.for_shape(Shape::of(contexts));
        let factors = defaults.factors_at(recompute.unwrap_or(defaults.recompute.share));
        let mode = Mode::from_name(
            name.unwrap_or("ape"),
            temperature.unwrap_or(factors.temperature),
            scale.unwrap_or(factors.scale),
        )?;
        match (mode, recompute) {
            (Mode::Ape { .. }, None) => mode.with_recompute(defaults.recompute),
            (_, None) => Ok(mode),
            (_, Some(share)) => {
                mode.with_recompute(Recompute::new(share, defaults.recompute.selection)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_short_contexts_are_many_shot_and_take_their_own_defaults() {
        let demonstrations = vec![vec![1; 20]; 8];
        let documents = vec![vec![1; 200]; 8];
        assert_eq!(Shape::of(&demonstrations), Shape::ManyShot);
        assert_eq!(Shape::of(&documents), Shape::Documents);
        assert_eq!(Shape::of(&demonstrations[..7]), Shape::Documents);

        let many_shot = ApeFactors {
            temperature: 0.3,
            scale: 0.6,
        };
        let defaults = ApeDefaults {
            many_shot: Some(ShapeDefaults {
                factors: many_shot,
                ..ShapeDefaults::default()
            }),
            ..ApeDefaults::default()
        };
        let ape = |contexts: &[Vec<u32>], t: Option<f32>| {
            defaults
                .mode(contexts, None, t, None, None)
                .unwrap()
                .factors()
        };
        assert_eq!(ape(&demonstrations, None), Some(many_shot));
        assert_eq!(ape(&documents, None), Some(defaults.documents.factors));
        // A factor the request names wins over either default.
        assert_eq!(ape(&demonstrations, Some(1.0)).unwrap().temperature, 1.0);
        assert_eq!(ape(&demonstrations, Some(1.0)).unwrap().scale, 0.6);
    }

    #[test]
    fn each_share_takes_the_factors_calibrated_nearest_to_it() {
        let at = |temperature: f32| ApeFactors {
            temperature,
            scale: 1.0,
        };
        let documents = ShapeDefaults {
            factors: at(1.0),
            recompute: Recompute::new(0.05, Selection::Attended).unwrap(),
            by_share: vec![(0.0, at(0.9)), (0.05, at(1.0)), (0.15, at(0.8))],
        };
        assert_eq!(documents.factors_at(0.0), at(0.9));
        assert_eq!(documents.factors_at(0.05), at(1.0));
        assert_eq!(
            documents.factors_at(0.1),
            at(1.0),
            "as near: the smaller share's"
        );
        assert_eq!(documents.factors_at(0.5), at(0.8));
        let uncalibrated = ShapeDefaults::default();
        assert_eq!(uncalibrated.factors_at(0.3), uncalibrated.factors);

        let defaults = ApeDefaults {
            documents,
            many_shot: None,
        };
        let one_document = [vec![1; 100]];
        let factors = |recompute: Option<f32>, temperature: Option<f32>| {
            defaults
                .mode(&one_document, None, temperature, None, recompute)
                .unwrap()
                .factors()
                .unwrap()
        };
        assert_eq!(factors(None, None), at(1.0), "the default share's");
        assert_eq!(factors(Some(0.0), None), at(0.9));
        assert_eq!(factors(Some(0.0), Some(0.7)).temperature, 0.7);
    }
}
