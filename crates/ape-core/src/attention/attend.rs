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

/// The most blocks of [`LANES`] rows one task scores and weighs together, where there are
/// blocks enough to keep the threads busy: they share each chunk of keys and values
/// widened to f32, which a block alone would widen for itself.
const BLOCKS_PER_TASK: usize = 4;

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

/// A piece of work: up to [`BLOCKS_PER_TASK`] blocks of [`LANES`] query rows of one job's
/// KV group over all their keys, or one block over a run of its keys when the rows alone
/// leave threads idle.
struct Task<'a> {
    job: usize,
    group: usize,
    /// Rows of the group: row `r` is token `r / group_size` of the job, head `r % group_size`
    /// of the group; blocks of [`LANES`] from the first.
    rows: Range<usize>,
    /// Indices into the job's key sequence; a run starts on a [`CHUNK`] boundary.
    keys: Range<usize>,
    /// Whether `keys` are all the keys the rows see.
    whole: bool,
    spans: &'a [Span<'a>],
    window: Option<&'a Window>,
}

impl Task<'_> {
    /// The task's blocks of rows.
    fn blocks(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.rows
            .clone()
            .step_by(LANES)
            .map(|start| start..(start + LANES).min(self.rows.end))
    }
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
    // Enough tasks for the threads to share the work out evenly, each as many blocks as
    // that leaves.
    let blocks_per_task = (units / (4 * threads)).clamp(1, BLOCKS_PER_TASK);
    let mut tasks = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let rows = job.tokens.len() * group_size;
        for (g, spans) in job.spans.iter().enumerate() {
            let total: usize = spans.iter().map(|s| s.rows(d)).sum();
            for start in (0..rows).step_by(LANES * blocks_per_task) {
                let block = start..(start + LANES * blocks_per_task).min(rows);
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

    let scored: Vec<Vec<Scored>> = tasks
        .par_iter()
        .map(|task| {
            let blocks: Vec<RowLanes> = task
                .blocks()
                .map(|rows| row_lanes(q, heads, d, group_size, &jobs[task.job], (task.group, rows)))
                .collect();
            score_task(d, task, &blocks)
        })
        .collect();
    // Each block of rows with the task that scored it (or one of the runs of its keys).
    let blocks: Vec<(&Task<'_>, Range<usize>, Scored)> = tasks
        .iter()
        .zip(scored)
        .flat_map(|(task, scored)| task.blocks().zip(scored).map(move |(b, s)| (task, b, s)))
        .collect();

    // Runs of one block of rows are neighbours in `blocks`: take the maximum over them,
    // then weigh each run against it, and add up every run's chunks in key order.
    let mut results: Vec<Attended> = jobs
        .iter()
        .map(|job| Attended {
            out: vec![0.0; job.tokens.len() * heads * d],
            lse: vec![f32::NEG_INFINITY; job.tokens.len() * heads],
        })
        .collect();
    let mut i = 0;
    while i < blocks.len() {
        let (task, rows, _) = &blocks[i];
        let same_block = |k: usize| {
            let (other, other_rows, _) = &blocks[k];
            (other.job, other.group, other_rows.start) == (task.job, task.group, rows.start)
        };
        let mut next = i + 1;
        while next < blocks.len() && same_block(next) {
            next += 1;
        }
        let (max, sums) = match &blocks[i].2 {
            Scored::Whole { max, sums } if next == i + 1 => (*max, sums.clone()),
            _ => {
                let mut max = [f32::NEG_INFINITY; LANES];
                for (_, _, s) in &blocks[i..next] {
                    let Scored::Part { max: m, .. } = s else {
                        unreachable!("a block split into runs has parts only")
                    };
                    for (a, b) in max.iter_mut().zip(m) {
                        *a = a.max(*b);
                    }
                }
                let parts: Vec<Vec<ChunkSums>> = blocks[i..next]
                    .par_iter()
                    .map(|(run, rows, s)| {
                        let Scored::Part { scores, .. } = s else {
                            unreachable!("checked above")
                        };
                        let mut sums = weigh(d, run, &[(scores, &max, rows.len())]);
                        sums.pop().expect("one block, one list")
                    })
                    .collect();
                let mut total = ChunkSums::zero(d);
                for chunk in parts.iter().flatten() {
                    total.add(chunk);
                }
                (max, total)
            }
        };
        let result = &mut results[task.job];
        for (l, r) in rows.clone().enumerate() {
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

/// A block of a task's query rows, scaled and transposed into lanes (unused lanes hold
/// zeros and see no key).
fn row_lanes(
    q: &[f32],
    heads: usize,
    d: usize,
    group_size: usize,
    job: &Job<'_>,
    (group, rows): (usize, Range<usize>),
) -> RowLanes {
    let mut lanes = RowLanes {
        q: vec![[0.0; LANES]; d],
        seen: [0; LANES],
        position: [0; LANES],
    };
    for (l, r) in rows.enumerate() {
        let t = r / group_size;
        let h = group * group_size + r % group_size;
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

/// Score each block of a task's rows against its run of keys; a task with every key of
/// its rows goes on to weigh them.
fn score_task(d: usize, task: &Task<'_>, blocks: &[RowLanes]) -> Vec<Scored> {
    let mut scores: Vec<Vec<Lanes>> = blocks
        .iter()
        .map(|_| vec![[0.0; LANES]; task.keys.len()])
        .collect();
    let mut keys = Vec::new();
    let span_rows: Vec<usize> = task.spans.iter().map(|s| s.rows(d)).collect();
    for chunk in (task.keys.start..task.keys.end).step_by(CHUNK) {
        let range = chunk..(chunk + CHUNK).min(task.keys.end);
        let at = chunk - task.keys.start..range.end - task.keys.start;
        // Keys out of every row's window are not even gathered: in long inputs, local
        // layers see a small part of them.
        let positions = task
            .window
            .map(|w| (w, w.key_positions(&span_rows, range.clone())));
        let hidden: Vec<bool> = blocks
            .iter()
            .map(|rows| {
                positions
                    .as_ref()
                    .is_some_and(|(window, positions)| window.hides_all(positions, chunk, rows))
            })
            .collect();
        if !hidden.iter().all(|&h| h) {
            gather(task.spans, d, range.clone(), |s| s.k, &mut keys);
        }
        for ((rows, scores), hidden) in blocks.iter().zip(&mut scores).zip(hidden) {
            let out = &mut scores[at.clone()];
            if hidden {
                out.fill([f32::NEG_INFINITY; LANES]);
                continue;
            }
            lanes::score(&rows.q, &keys, chunk, &rows.seen, out);
            if let Some((window, positions)) = &positions {
                window.mask(positions, rows, out);
            }
        }
    }
    let maxima: Vec<Lanes> = scores
        .iter()
        .map(|scores| {
            let mut max = [f32::NEG_INFINITY; LANES];
            for s in scores {
                for (m, s) in max.iter_mut().zip(s) {
                    *m = m.max(*s);
                }
            }
            max
        })
        .collect();
    if !task.whole {
        return scores
            .into_iter()
            .zip(maxima)
            .map(|(scores, max)| Scored::Part { max, scores })
            .collect();
    }
    let weighed: Vec<(&[Lanes], &Lanes, usize)> = scores
        .iter()
        .zip(&maxima)
        .zip(task.blocks())
        .map(|((scores, max), rows)| (scores.as_slice(), max, rows.len()))
        .collect();
    weigh(d, task, &weighed)
        .into_iter()
        .zip(&maxima)
        .map(|(chunks, max)| {
            let mut sums = ChunkSums::zero(d);
            for chunk in &chunks {
                sums.add(chunk);
            }
            Scored::Whole { max: *max, sums }
        })
        .collect()
}

/// For each block of rows (its scores over the task's run of keys, its maximum over all
/// the keys it sees, and how many rows it has), the chunk sums of its weights against
/// that maximum; none for the chunks no row of the block sees. The blocks share each
/// chunk of values widened to f32.
fn weigh(d: usize, task: &Task<'_>, blocks: &[(&[Lanes], &Lanes, usize)]) -> Vec<Vec<ChunkSums>> {
    let mut values = Vec::new();
    let mut weights = Vec::new();
    let mut sums: Vec<Vec<ChunkSums>> = blocks.iter().map(|_| Vec::new()).collect();
    for chunk in (task.keys.start..task.keys.end).step_by(CHUNK) {
        let range = chunk..(chunk + CHUNK).min(task.keys.end);
        let at = chunk - task.keys.start..range.end - task.keys.start;
        // A chunk no row sees would add exact zeros.
        let seen: Vec<bool> = blocks
            .iter()
            .map(|(scores, _, _)| {
                scores[at.clone()]
                    .iter()
                    .any(|s| s.iter().any(|&x| x != f32::NEG_INFINITY))
            })
            .collect();
        if !seen.iter().any(|&s| s) {
            continue;
        }
        gather(task.spans, d, range, |s| s.v, &mut values);
        for ((&(scores, max, rows), sums), seen) in blocks.iter().zip(&mut sums).zip(seen) {
            if !seen {
                continue;
            }
            weights.clear();
            weights.extend_from_slice(&scores[at.clone()]);
            let mut chunk_sums = ChunkSums::zero(d);
            lanes::weigh(
                &mut weights,
                max,
                &values,
                &mut chunk_sums.sum,
                &mut chunk_sums.acc,
                rows,
            );
            sums.push(chunk_sums);
        }
    }
    sums
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
