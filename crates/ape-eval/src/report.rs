//! What a run reports: per-setting summaries (the task's metric, its ratio to sequential,
//! the gold answer's mean log-likelihood, the mean KL divergence from sequential), the
//! T x S grid of a sweep with the point it chooses, JSON with every prediction, a Markdown
//! table, and an SVG plot of the metric against the number of contexts.

use std::fmt::Write as _;
use std::path::Path;

use ape_core::engine::Mode;
use plotters::prelude::*;
use serde::Serialize;

use crate::error::{EvalError, Result};
use crate::run::{ExampleResult, Outcome, Setting};
use crate::tasks::Metric;

/// One setting's results over a run's examples.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The setting's label, as in [`Report::settings`].
    pub setting: String,
    /// Examples this setting could read.
    pub examples: usize,
    /// Examples it could not (beyond the model's window).
    pub unavailable: usize,
    /// The task's metric (see [`Metric`]), a mean over the examples.
    pub metric: Option<f64>,
    /// Generation tasks: the share (0 to 1) of answers equal to a gold one once normalised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Generation tasks: the mean token F1 (0 to 1) of the answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// Generation tasks: the share (0 to 1) of answers that contain a gold one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contains: Option<f64>,
    /// Label tasks: the share (0 to 1) of questions given the gold label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// The standard error of `metric` (its spread over the examples, over the square root
    /// of their number).
    pub metric_stderr: Option<f64>,
    /// Label tasks: the share of examples where this setting chose sequential's label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agrees_with_sequential: Option<f64>,
    /// This setting's metric over sequential's.
    pub ratio_to_sequential: Option<f64>,
    /// The mean log-likelihood (nats) of the gold answer's tokens.
    pub gold_logprob: Option<f64>,
    /// The mean KL divergence (nats) of sequential's next-token distributions on the gold
    /// answer from this setting's; none where sequential reading is beyond the window.
    pub kl_vs_sequential: Option<f64>,
}

/// The results of one number of contexts.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Contexts per question in this run.
    pub contexts: usize,
    /// One summary per setting, in the order of [`Report::settings`].
    pub summaries: Vec<Summary>,
    /// Every example of the run with each setting's outcome.
    pub examples: Vec<ExampleResult>,
}

/// The APE setting a sweep chose.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    /// APE's attention temperature T at the chosen point.
    pub temperature: f32,
    /// APE's scaling factor S at the chosen point.
    pub scale: f32,
    /// How the point was chosen, in words: by the least KL from sequential, or by the
    /// metric where sequential reading was beyond the window.
    pub rule: &'static str,
}

/// Everything one evaluation measured on a task, a run per number of contexts, written out
/// as JSON ([`Report::write_json`]), Markdown ([`Report::markdown`]) or SVG
/// ([`Report::plot_svg`]).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The task's name (`squad`, `needle`, ..., or a task file's name without extension).
    pub task: String,
    /// The model's name, as shown in the tables and the plot's title.
    pub model: String,
    /// `dev` or `test`.
    pub split: String,
    /// The seed that drew the questions, demonstrations and distractors.
    pub seed: u64,
    /// Questions of the draw left out from its start (`--skip`): this report is a part of
    /// a longer run.
    #[serde(skip_serializing_if = "is_zero")]
    pub skip: usize,
    /// The number the task is judged by, in the tables and the plot.
    pub metric: Metric,
    /// The labels of the settings, in the order of every run's summaries and outcomes.
    pub settings: Vec<String>,
    /// One per number of contexts, in the order they were added.
    pub runs: Vec<RunReport>,
    /// The APE sweep point closest to sequential reading over all runs; none without a
    /// sweep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep_choice: Option<Choice>,
    #[serde(skip)]
    modes: Vec<(Mode, bool)>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The standard error of the mean of `values`; none for fewer than two.
fn standard_error(values: impl Iterator<Item = f64>) -> Option<f64> {
    let values: Vec<f64> = values.collect();
    if values.len() < 2 {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((variance / n).sqrt())
}

/// The summaries of every setting over `examples`.
pub(crate) fn summarize(
    examples: &[ExampleResult],
    settings: &[Setting],
    metric: Metric,
) -> Vec<Summary> {
    let column = |i: usize| examples.iter().map(move |e| &e.outcomes[i]);
    let sequential_at = settings.iter().position(|s| s.mode == Mode::Sequential);
    let metric_of = move |o: &Outcome| match metric {
        Metric::F1 => o.f1,
        Metric::Contains => o.contains,
        Metric::Accuracy => o.accuracy,
    };
    let mut summaries: Vec<Summary> = settings
        .iter()
        .enumerate()
        .map(|(i, setting)| {
            let field = |get: fn(&Outcome) -> Option<f64>| mean(column(i).filter_map(get));
            let (exact_match, f1, contains, accuracy) = (
                field(|o| o.exact_match),
                field(|o| o.f1),
                field(|o| o.contains),
                field(|o| o.accuracy),
            );
            Summary {
                setting: setting.label.clone(),
                metric_stderr: standard_error(column(i).filter_map(metric_of)),
                agrees_with_sequential: match (metric, sequential_at) {
                    (Metric::Accuracy, Some(reference)) => mean(examples.iter().filter_map(|e| {
                        let (this, sequential) = (&e.outcomes[i], &e.outcomes[reference]);
                        Some(f64::from(u8::from(
                            this.prediction.as_ref()? == sequential.prediction.as_ref()?,
                        )))
                    })),
                    _ => None,
                },
                examples: column(i).filter(|o| o.unavailable.is_none()).count(),
                unavailable: column(i).filter(|o| o.unavailable.is_some()).count(),
                metric: mean(column(i).filter_map(metric_of)),
                exact_match,
                f1,
                contains,
                accuracy,
                ratio_to_sequential: None,
                gold_logprob: field(|o| o.gold_logprob),
                kl_vs_sequential: field(|o| o.kl_vs_sequential),
            }
        })
        .collect();
    let sequential = sequential_at.and_then(|i| summaries[i].metric);
    for s in &mut summaries {
        s.ratio_to_sequential = match (s.metric, sequential) {
            (Some(m), Some(seq)) if seq > 0.0 => Some(m / seq),
            _ => None,
        };
    }
    summaries
}

impl Report {
    /// A report with no runs yet of `task` read by `model` on `split`; every run added
    /// must hold outcomes for these `settings`, in this order.
    pub fn new(
        task: String,
        model: String,
        split: String,
        seed: u64,
        metric: Metric,
        settings: &[Setting],
    ) -> Report {
        Report {
            task,
            model,
            split,
            seed,
            skip: 0,
            metric,
            settings: settings.iter().map(|s| s.label.clone()).collect(),
            runs: Vec::new(),
            sweep_choice: None,
            modes: settings.iter().map(|s| (s.mode, s.in_sweep)).collect(),
        }
    }

    /// Marks the report as the part of a longer run that starts after `skip` questions.
    pub fn skipping(self, skip: usize) -> Report {
        Report { skip, ..self }
    }

    /// Adds the run with `contexts` contexts per question (its `examples` as
    /// [`Evaluator::run`](crate::Evaluator::run) returned them for `settings`), summarises
    /// it and chooses the sweep point anew.
    pub fn add_run(&mut self, contexts: usize, examples: Vec<ExampleResult>, settings: &[Setting]) {
        let summaries = summarize(&examples, settings, self.metric);
        self.runs.push(RunReport {
            contexts,
            summaries,
            examples,
        });
        self.sweep_choice = self.choose();
    }

    /// The sweep point with the least mean KL divergence from sequential over all runs
    /// (closest to what sequential reading would say, a measure that does not saturate or
    /// jump with a handful of examples), the gold answer's log-likelihood breaking ties; by
    /// the metric, then the log-likelihood, where sequential could not be read.
    fn choose(&self) -> Option<Choice> {
        let points: Vec<usize> = (0..self.modes.len()).filter(|&i| self.modes[i].1).collect();
        let over_runs = |i: usize, get: fn(&Summary) -> Option<f64>| {
            mean(self.runs.iter().filter_map(|r| get(&r.summaries[i])))
        };
        let by_kl = points
            .iter()
            .all(|&i| over_runs(i, |s| s.kl_vs_sequential).is_some());
        let key = |i: usize| {
            let likelihood = over_runs(i, |s| s.gold_logprob).unwrap_or(f64::NEG_INFINITY);
            if by_kl {
                (
                    -over_runs(i, |s| s.kl_vs_sequential).unwrap_or(f64::INFINITY),
                    likelihood,
                )
            } else {
                (over_runs(i, |s| s.metric).unwrap_or(0.0), likelihood)
            }
        };
        let best = points.into_iter().max_by(|&a, &b| {
            key(a)
                .partial_cmp(&key(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        })?;
        let factors = self.modes[best].0.factors()?;
        Some(Choice {
            temperature: factors.temperature,
            scale: factors.scale,
            rule: if by_kl {
                "least mean KL from sequential on the gold answer's tokens"
            } else {
                "highest metric, sequential being beyond the window"
            },
        })
    }

    /// Writes the whole report, every prediction included, to `path` as JSON; fails with
    /// [`EvalError::Write`] where the file cannot be written.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| write_error(path, e))?;
        std::fs::write(path, text).map_err(|e| write_error(path, e))
    }

    /// The summaries as Markdown: one table per number of contexts, the sweep's grid, and
    /// the metric against the number of contexts when there are several.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let metric = self.metric.name();
        for run in &self.runs {
            let n = run.examples.len();
            let _ = writeln!(
                out,
                "\n**{}**, {}, {} split, seed {}{}, {n} examples, {} contexts each\n",
                self.task,
                self.model,
                self.split,
                self.seed,
                match self.skip {
                    0 => String::new(),
                    skip => format!(" after its first {skip} questions"),
                },
                run.contexts
            );
            let columns = if self.metric == Metric::Accuracy {
                "accuracy | ± | same label as sequential |".to_string()
            } else {
                format!("EM | F1 | contains | ± ({metric}) |")
            };
            let rule = "---:|".repeat(columns.matches('|').count());
            let _ = writeln!(
                out,
                "| setting | {columns} ÷ sequential ({metric}) | gold log-lik | KL vs sequential |\n|---|{rule}---:|---:|---:|"
            );
            for (s, (_, in_sweep)) in run.summaries.iter().zip(&self.modes) {
                if *in_sweep {
                    continue;
                }
                let scores = if self.metric == Metric::Accuracy {
                    format!(
                        "{} | {} | {} |",
                        availability(s, pct(s.accuracy)),
                        pct(s.metric_stderr),
                        pct(s.agrees_with_sequential)
                    )
                } else {
                    format!(
                        "{} | {} | {} | {} |",
                        availability(s, pct(s.exact_match)),
                        pct(s.f1),
                        pct(s.contains),
                        pct(s.metric_stderr)
                    )
                };
                let _ = writeln!(
                    out,
                    "| {} | {scores} {} | {} | {} |",
                    s.setting,
                    ratio(s.ratio_to_sequential),
                    num(s.gold_logprob, 2),
                    kl(s.kl_vs_sequential),
                );
            }
        }
        self.sweep_markdown(&mut out);
        if self.runs.len() > 1 {
            let main: Vec<usize> = (0..self.modes.len())
                .filter(|&i| !self.modes[i].1)
                .collect();
            let _ = writeln!(out, "\n{metric} by number of contexts\n");
            let header: Vec<&str> = main.iter().map(|&i| self.settings[i].as_str()).collect();
            let _ = writeln!(
                out,
                "| contexts | {} |\n|---:|{}",
                header.join(" | "),
                "---:|".repeat(main.len())
            );
            for run in &self.runs {
                let cells: Vec<String> = main
                    .iter()
                    .map(|&i| availability(&run.summaries[i], pct(run.summaries[i].metric)))
                    .collect();
                let _ = writeln!(out, "| {} | {} |", run.contexts, cells.join(" | "));
            }
        }
        out
    }

    fn sweep_markdown(&self, out: &mut String) {
        let points: Vec<(usize, f32, f32)> = (0..self.modes.len())
            .filter(|&i| self.modes[i].1)
            .filter_map(|i| {
                self.modes[i]
                    .0
                    .factors()
                    .map(|f| (i, f.temperature, f.scale))
            })
            .collect();
        if points.is_empty() {
            return;
        }
        let mut temperatures: Vec<f32> = points.iter().map(|p| p.1).collect();
        let mut scales: Vec<f32> = points.iter().map(|p| p.2).collect();
        for axis in [&mut temperatures, &mut scales] {
            axis.sort_by(f32::total_cmp);
            axis.dedup();
        }
        let over_runs = |i: usize, get: fn(&Summary) -> Option<f64>| {
            mean(self.runs.iter().filter_map(|r| get(&r.summaries[i])))
        };
        let with_metric = points
            .iter()
            .any(|&(i, _, _)| over_runs(i, |s| s.metric).is_some());
        let _ = writeln!(
            out,
            "\nSweep ({} split, mean over {} run(s)): {}gold log-lik / mean KL vs sequential; rows T, columns S\n",
            self.split,
            self.runs.len(),
            if with_metric { format!("{} / ", self.metric.name()) } else { String::new() }
        );
        let _ = writeln!(
            out,
            "| T \\ S | {} |\n|---:|{}",
            scales
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(" | "),
            "---:|".repeat(scales.len())
        );
        for t in &temperatures {
            let cells: Vec<String> = scales
                .iter()
                .map(|s| {
                    points.iter().find(|p| p.1 == *t && p.2 == *s).map_or(
                        "".into(),
                        |&(i, _, _)| {
                            let chosen = self
                                .sweep_choice
                                .as_ref()
                                .is_some_and(|c| c.temperature == *t && c.scale == *s);
                            let metric = if with_metric {
                                format!("{} / ", pct(over_runs(i, |s| s.metric)))
                            } else {
                                String::new()
                            };
                            let cell = format!(
                                "{metric}{} / {}",
                                num(over_runs(i, |s| s.gold_logprob), 2),
                                kl(over_runs(i, |s| s.kl_vs_sequential))
                            );
                            if chosen {
                                format!("**{cell}**")
                            } else {
                                cell
                            }
                        },
                    )
                })
                .collect();
            let _ = writeln!(out, "| {t} | {} |", cells.join(" | "));
        }
        if let Some(c) = &self.sweep_choice {
            let _ = writeln!(
                out,
                "\nChosen: T = {}, S = {} ({}).",
                c.temperature, c.scale, c.rule
            );
        }
    }

    /// The task's metric against the number of contexts, one line per main setting
    /// (sweep points left out); settings beyond the window have no point there.
    pub fn plot_svg(&self, path: &Path) -> Result<()> {
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
            root.fill(&WHITE)?;
            let lo = self.runs.iter().map(|r| r.contexts).min().unwrap_or(1) as f64;
            let hi = self.runs.iter().map(|r| r.contexts).max().unwrap_or(2) as f64;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "{}: {} vs contexts ({}, {} split)",
                        self.task,
                        self.metric.name(),
                        self.model,
                        self.split
                    ),
                    ("sans-serif", 18),
                )
                .margin(16)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..1.0f64)?;
            chart
                .configure_mesh()
                .x_desc("contexts (log scale)")
                .y_desc(self.metric.name())
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()?;
            let main = (0..self.modes.len()).filter(|&i| !self.modes[i].1);
            for (colour_at, i) in main.enumerate() {
                let colour = Palette99::pick(colour_at).to_rgba();
                let points: Vec<(f64, f64)> = self
                    .runs
                    .iter()
                    .filter_map(|r| r.summaries[i].metric.map(|m| (r.contexts as f64, m)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                    .label(self.settings[i].clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, colour.filled())),
                )?;
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .position(SeriesLabelPosition::LowerLeft)
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| write_error(path, e))
    }
}

fn write_error(path: &Path, e: impl ToString) -> EvalError {
    EvalError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn availability(s: &Summary, value: String) -> String {
    if s.examples == 0 && s.unavailable > 0 {
        "beyond window".to_string()
    } else {
        value
    }
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1}%", 100.0 * v))
}

fn ratio(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.0}%", 100.0 * v))
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn kl(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.4}"))
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
