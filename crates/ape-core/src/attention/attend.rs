//! The one kernel all attention runs on: query rows in vector lanes, a softmax against
//! each row's maximum over every key it sees, and sums in a fixed order.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use super::lanes;
use crate::kernels::dense::widen;

/// Query rows one task holds, one per vector lane.
pub(super) const LANES: usize = 16;

/// Keys whose weights and weighted values are summed as one partial sum: the partial sums
/// are added in key order, so how keys are split between tasks never changes a result.
const CHUNK: usize = 256;

/// The fewest keys worth a task of their own when one block of rows' keys are split
/// between threads.
const MIN_SPLIT_KEYS: usize = 512;

/// One KV head's keys and values for consecutive positions: rows of `head_dim`.
#[derive(Clone, Copy)]
pub(super) struct Span<'a> {
    pub(super) k: &'a [f16],
    pub(super) v: &'a [f16],
}

impl<'a> Span<'a> {
    pub(super) fn rows(&self, d: usize) -> usize {
        self.k.len() / d
    }
}

/// The queries of some tokens of a batch over one set of keys.
pub(super) struct Job<'a> {
    /// The tokens (rows of `q`) whose queries attend.
    pub(super) tokens: Range<usize>,
    /// For each KV head, its keys in position order, as spans.
    pub(super) spans: Vec<Vec<Span<'a>>>,
    /// Which keys each token sees.
    pub(super) visible: Visible,
    /// Factor applied to `q . k` before the softmax.
    pub(super) score_scale: f32,
    /// A sliding window over positions, for a model's local layers.
    pub(super) window: Option<Window>,
}

/// A sliding window: a token sees a key only if the key is fewer than `size` positions
/// behind it. Keys outside it are masked like keys a token does not see at all, so they
/// add exact zeros and a row's sums keep their order.
pub(super) struct Window {
    pub(super) size: usize,
    /// The position of each of the job's tokens.
    pub(super) token_positions: Vec<usize>,
    /// The position of each span's first key (every KV head's spans lie alike), or `None`
    /// for a span the window does not apply to.
    pub(super) span_positions: Vec<Option<usize>>,
}

impl Window {
    /// The position of each of keys `range` of the job's key sequence, given the spans'
    /// lengths.
    fn key_positions(&self, span_rows: &[usize], range: Range<usize>) -> Vec<Option<usize>> {
        let mut positions = Vec::with_capacity(range.len());
        let mut start = 0;
        for (&len, &first) in span_rows.iter().zip(&self.span_positions) {
            let (from, to) = (range.start.max(start), range.end.min(start + len));
            positions.extend((from..to).map(|key| first.map(|p| p + key - start)));
            start += len;
        }
        positions
    }

    /// Mask, in the scores of keys at `positions`, the keys out of each lane's window.
    fn mask(&self, positions: &[Option<usize>], rows: &RowLanes, out: &mut [Lanes]) {
        for (scores, key) in out.iter_mut().zip(positions) {
            let Some(key) = key else { continue };
            for (s, &query) in scores.iter_mut().zip(&rows.position) {
                if query >= key + self.size {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Whether no lane sees any of the keys at `positions` (keys `first..` of the job):
    /// each is past what the lane sees, or out of its window.
    fn hides_all(&self, positions: &[Option<usize>], first: usize, rows: &RowLanes) -> bool {
        let newest = positions
            .iter()
            .try_fold(0, |newest: usize, key| key.map(|p| newest.max(p)));
        let Some(newest) = newest else {
            return false;
        };
        rows.seen
            .iter()
            .zip(&rows.position)
            .all(|(&seen, &query)| seen <= first || query >= newest + self.size)
    }
}

/// The keys a job's tokens see, always a first run of its keys.
pub(super) enum Visible {
    /// Every key.
    All,
    /// The i-th token sees the first `start + i + 1` keys.
    Causal { start: usize },
    /// The i-th token sees the first `upto[i]` keys; the counts never decrease.
    Upto(Vec<usize>),
}

impl Visible {
    fn keys_seen_by(&self, token: usize) -> usize {
        match self {
            Visible::All => usize::MAX,
            Visible::Causal { start } => start + token + 1,
            Visible::Upto(upto) => upto[token],
        }
    }
}

/// A job's normalised outputs (tokens x heads x head_dim) and the log-sum-exp of each
/// (token, head)'s scaled scores (`-inf` when it saw no key).
pub(super) struct Attended {
    pub(super) out: Vec<f32>,
    pub(super) lse: Vec<f32>,
}

/// A piece of work: up to [`LANES`] query rows of one job's KV group over a run of its keys
/// (all of them, or one of several runs when the rows alone leave threads idle).
struct Task<'a> {
    job: usize,
    group: usize,
    /// Rows of the group: row `r` is token `r / group_size` of the job, head `r % group_size`
    /// of the group.
    rows: Range<usize>,
    /// Indices into the job's key sequence; a run starts on a [`CHUNK`] boundary.
    keys: Range<usize>,
    /// Whether `keys` are all the keys the rows see.
    whole: bool,
    spans: &'a [Span<'a>],
    window: Option<&'a Window>,
}

/// One query row per lane.
pub(super) type Lanes = [f32; LANES];

/// A task's rows, transposed into lanes: `q[i][l]` is element `i` of row `l`'s scaled
/// query, row `l` sees the first `seen[l]` keys of the job, and sits at `position[l]`
/// (with a window only).
struct RowLanes {
    q: Vec<Lanes>,
    seen: [usize; LANES],
    position: [usize; LANES],
}

/// The weighted sums of some rows over one [`CHUNK`] of keys, all relative to the rows'
/// maximum score over every key they see.
#[derive(Clone)]
struct ChunkSums {
    sum: Lanes,
    /// `acc[i][l]`: element `i` of row `l`'s weighted value sum.
    acc: Vec<Lanes>,
}

/// Where a task stands after scoring: done, or waiting for the maximum over its rows'
/// other runs of keys.
enum Scored {
    Whole { max: Lanes, sums: ChunkSums },
    Part { max: Lanes, scores: Vec<Lanes> },
}

/// Run the jobs. Each (job, KV group, block of up to [`LANES`] query rows) is one task for
/// the thread pool, or several over runs of its keys when there are too few blocks to keep
/// the threads busy (as in decoding); runs are joined afterwards.
///
/// A row's result is computed by the same arithmetic whatever the batch around it and
/// however its keys are split: every score is one chain of multiply-adds over the head's
/// elements, the softmax is taken against the row's maximum over all the keys it sees (an
/// exact, order-free quantity), and weights and weighted values are summed per chunk of
/// [`CHUNK`] keys in key order, the chunks then added in key order. Keys a row does not see
/// contribute exact zeros.
pub(super) fn attend(q: &[f32], heads: usize, d: usize, jobs: Vec<Job<'_>>) -> Vec<Attended> {
    let Some(kv_heads) = jobs.first().map(|j| j.spans.len()) else {
        return Vec::new();
    };
    let group_size = heads / kv_heads;
    let threads = rayon::current_num_threads();
    let units: usize = jobs
        .iter()
        .map(|j| (j.tokens.len() * group_size).div_ceil(LANES) * kv_heads)
        .sum();
    let mut tasks = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let rows = job.tokens.len() * group_size;
        for (g, spans) in job.spans.iter().enumerate() {
            let total: usize = spans.iter().map(|s| s.rows(d)).sum();
            for start in (0..rows).step_by(LANES) {
                let block = start..(start + LANES).min(rows);
                let last_token = (block.end - 1) / group_size;
                let seen = job.visible.keys_seen_by(last_token).min(total);
                let runs = if units >= 2 * threads {
                    1
                } else {
                    (2 * threads)
                        .div_ceil(units)
                        .min(seen / MIN_SPLIT_KEYS)
                        .max(1)
                };
                let per_run = seen.div_ceil(runs).next_multiple_of(CHUNK).max(CHUNK);
                let mut first = 0;
                loop {
                    let keys = first..(first + per_run).min(seen);
                    tasks.push(Task {
                        job: j,
                        group: g,
                        rows: block.clone(),
                        whole: keys.start == 0 && keys.end == seen,
                        keys,
                        spans,
                        window: job.window.as_ref(),
                    });
                    first += per_run;
                    if first >= seen {
                        break;
                    }
                }
            }
        }
    }

    let scored: Vec<Scored> = tasks
        .par_iter()
        .map(|task| {
            let rows = row_lanes(q, heads, d, group_size, &jobs[task.job], task);
            score_task(d, task, &rows)
        })
        .collect();

    // Runs of one block of rows are neighbours in `tasks`: take the maximum over them, then
    // weigh each run against it, and add up every run's chunks in key order.
    let mut results: Vec<Attended> = jobs
        .iter()
        .map(|job| Attended {
            out: vec![0.0; job.tokens.len() * heads * d],
            lse: vec![f32::NEG_INFINITY; job.tokens.len() * heads],
        })
        .collect();
    let mut i = 0;
    while i < tasks.len() {
        let same_block = |k: usize| {
            (tasks[k].job, tasks[k].group, tasks[k].rows.start)
                == (tasks[i].job, tasks[i].group, tasks[i].rows.start)
        };
        let mut next = i + 1;
        while next < tasks.len() && same_block(next) {
            next += 1;
        }
        let (max, sums) = match &scored[i] {
            Scored::Whole { max, sums } if next == i + 1 => (*max, sums.clone()),
            _ => {
                let mut max = [f32::NEG_INFINITY; LANES];
                for s in &scored[i..next] {
                    let Scored::Part { max: m, .. } = s else {
                        unreachable!("a block split into runs has parts only")
                    };
                    for (a, b) in max.iter_mut().zip(m) {
                        *a = a.max(*b);
                    }
                }
                let parts: Vec<Vec<ChunkSums>> = (i..next)
                    .into_par_iter()
                    .map(|k| {
                        let Scored::Part { scores, .. } = &scored[k] else {
                            unreachable!("checked above")
                        };
                        weigh_run(d, &tasks[k], scores, &max)
                    })
                    .collect();
                let mut total = ChunkSums::zero(d);
                for chunk in parts.iter().flatten() {
                    total.add(chunk);
                }
                (max, total)
            }
        };
        let task = &tasks[i];
        let result = &mut results[task.job];
        for (l, r) in task.rows.clone().enumerate() {
            let (t, h) = (r / group_size, task.group * group_size + r % group_size);
            let at = t * heads + h;
            let out = &mut result.out[at * d..(at + 1) * d];
            if sums.sum[l] == 0.0 {
                out.fill(0.0);
                continue;
            }
            let inverse = 1.0 / sums.sum[l];
            for (o, a) in out.iter_mut().zip(&sums.acc) {
                *o = a[l] * inverse;
            }
            result.lse[at] = max[l] + sums.sum[l].ln();
        }
        i = next;
    }
    results
}

/// The task's query rows, scaled and transposed into lanes (unused lanes hold zeros and
/// see no key).
fn row_lanes(
    q: &[f32],
    heads: usize,
    d: usize,
    group_size: usize,
    job: &Job<'_>,
    task: &Task<'_>,
) -> RowLanes {
    let mut lanes = RowLanes {
        q: vec![[0.0; LANES]; d],
        seen: [0; LANES],
        position: [0; LANES],
    };
    for (l, r) in task.rows.clone().enumerate() {
        let t = r / group_size;
        let h = task.group * group_size + r % group_size;
        let row = &q[(job.tokens.start + t) * heads * d + h * d..][..d];
        for (lane, x) in lanes.q.iter_mut().zip(row) {
            lane[l] = x * job.score_scale;
        }
        lanes.seen[l] = job.visible.keys_seen_by(t);
        if let Some(window) = &job.window {
            lanes.position[l] = window.token_positions[t];
        }
    }
    lanes
}

impl ChunkSums {
    fn zero(d: usize) -> Self {
        ChunkSums {
            sum: [0.0; LANES],
            acc: vec![[0.0; LANES]; d],
        }
    }

    fn add(&mut self, other: &ChunkSums) {
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for (a, b) in self.acc.iter_mut().zip(&other.acc) {
            for (a, b) in a.iter_mut().zip(b) {
                *a += b;
            }
        }
    }
}

/// Score a task's rows against its run of keys; a task with every key of its rows goes on
/// to weigh them.
fn score_task(d: usize, task: &Task<'_>, rows: &RowLanes) -> Scored {
    let mut scores = vec![[0.0; LANES]; task.keys.len()];
    let mut keys = Vec::new();
    let span_rows: Vec<usize> = task.spans.iter().map(|s| s.rows(d)).collect();
    for (chunk, out) in (task.keys.start..task.keys.end)
        .step_by(CHUNK)
        .zip(scores.chunks_mut(CHUNK))
    {
        let range = chunk..chunk + out.len();
        // Keys out of every row's window are not even gathered: in long inputs, local
        // layers see a small part of them.
        let positions = task
            .window
            .map(|w| (w, w.key_positions(&span_rows, range.clone())));
        if let Some((window, positions)) = &positions {
            if window.hides_all(positions, chunk, rows) {
                out.fill([f32::NEG_INFINITY; LANES]);
                continue;
            }
        }
        gather(task.spans, d, range, |s| s.k, &mut keys);
        lanes::score(&rows.q, &keys, chunk, &rows.seen, out);
        if let Some((window, positions)) = &positions {
            window.mask(positions, rows, out);
        }
    }
    let mut max = [f32::NEG_INFINITY; LANES];
    for s in &scores {
        for (m, s) in max.iter_mut().zip(s) {
            *m = m.max(*s);
        }
    }
    if !task.whole {
        return Scored::Part { max, scores };
    }
    let mut sums = ChunkSums::zero(d);
    for chunk in weigh_run(d, task, &scores, &max) {
        sums.add(&chunk);
    }
    Scored::Whole { max, sums }
}

/// The chunk sums of a task's run of keys against the rows' maximum over all their keys;
/// none for the chunks no row sees.
fn weigh_run(d: usize, task: &Task<'_>, scores: &[Lanes], max: &Lanes) -> Vec<ChunkSums> {
    let mut values = Vec::new();
    let mut weights = Vec::new();
    (task.keys.start..task.keys.end)
        .step_by(CHUNK)
        .zip(scores.chunks(CHUNK))
        // A chunk no row sees would add exact zeros.
        .filter(|(_, scores)| {
            scores
                .iter()
                .any(|s| s.iter().any(|&x| x != f32::NEG_INFINITY))
        })
        .map(|(chunk, scores)| {
            gather(
                task.spans,
                d,
                chunk..chunk + scores.len(),
                |s| s.v,
                &mut values,
            );
            weights.clear();
            weights.extend_from_slice(scores);
            let mut sums = ChunkSums::zero(d);
            lanes::weigh(
                &mut weights,
                max,
                &values,
                &mut sums.sum,
                &mut sums.acc,
                task.rows.len(),
            );
            sums
        })
        .collect()
}

/// Keys `range` of a job's key sequence (its spans one after another), each row of `d`
/// taken from a span by `part` and widened to f32, into `out`.
fn gather<'a>(
    spans: &[Span<'a>],
    d: usize,
    range: Range<usize>,
    part: impl Fn(&Span<'a>) -> &'a [f16],
    out: &mut Vec<f32>,
) {
    out.resize(range.len() * d, 0.0);
    let mut filled = 0;
    let mut start = 0;
    for span in spans {
        let len = span.rows(d);
        let (from, to) = (range.start.max(start), range.end.min(start + len));
        if from < to {
            let src = &part(span)[(from - start) * d..(to - start) * d];
            widen(src, &mut out[filled..filled + src.len()]);
            filled += src.len();
        }
        start += len;
    }
    assert_eq!(filled, out.len(), "keys outside the spans");
}
