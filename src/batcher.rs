//! The batching policy, as a pure function over the jobs waiting in a worker.
//!
//! Rows, not jobs, are counted. A batch always takes the job at the front of the queue
//! (so no job and no shape starves), then jobs that can share one ORT call with it:
//! the same version, and inputs agreeing on every dimension but the batch one and the
//! axes the model declares paddable (stacking jobs of other shapes would mix one job's
//! numbers into another's answer). Jobs skipped for another version or shape keep
//! their place.
//!
//! Models without padding: jobs join in queue order (first come, first served within
//! a shape) while they fit in `max_rows`. A job larger than `max_rows` goes alone
//! (the runtime runs it `max_rows` rows at a time and reassembles its outputs).
//!
//! Models with padding (jobs of different lengths padded to the longest member): the
//! batch is also bounded by its cost, rows × padded length (the product of the padded
//! axes, TEI's `max_batch_tokens` in spirit), and by padding waste. Candidates are the
//! next `window` compatible jobs, tried nearest in length to the front job first (queue
//! order among equals), so a batch gathers jobs of similar length and padding stays
//! low; the first that would break a bound ends the batch. Reordering never reaches
//! past the window, and the front job is always served, so long jobs never starve.
//!
//! *When* a batch forms is the worker's business: as soon as an inference thread is
//! free it takes whatever is waiting, so a lone job never waits for a timer; with
//! `max_wait` set it waits that long from the first job for more rows.

use std::collections::VecDeque;

/// What the policy needs to know about a waiting job.
pub trait Batchable {
    /// Rows in the job's batch dimension.
    fn rows(&self) -> usize;
    /// Whether this job may be stacked with `first` in one ORT call (padded axes
    /// aside). Must be an equivalence on jobs that batch at all; a job that must run
    /// alone says `false` to every other job.
    fn batches_with(&self, first: &Self) -> bool;
    /// The job's length on each padded axis, in a fixed order (empty: its model
    /// declares no padding).
    fn lengths(&self) -> &[usize] {
        &[]
    }
}

/// The bounds of one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Rows per batch.
    pub max_rows: usize,
    /// Padded elements per batch: rows × the product of the padded lengths (0: no
    /// bound). Only padded models have lengths; for others this is rows.
    pub max_elements: usize,
    /// How many compatible jobs behind the front one a padded batch may choose from.
    pub window: usize,
    /// Largest share of a padded batch's elements that may be padding.
    pub max_waste: f64,
}

impl Limits {
    /// `max_rows` rows, no element bound, a window of four batches, 25% waste at most.
    pub fn rows(max_rows: usize) -> Limits {
        Limits {
            max_rows,
            max_elements: 0,
            window: max_rows.saturating_mul(4).max(16),
            max_waste: 0.25,
        }
    }
}

/// Rows waiting in `queue`.
pub fn waiting_rows<J: Batchable>(queue: &VecDeque<J>) -> usize {
    queue.iter().map(Batchable::rows).sum()
}

/// A batch's size so far: rows, and per padded axis the longest member.
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    /// Rows in the batch.
    pub rows: usize,
    /// Longest length per padded axis.
    pub lengths: Vec<usize>,
    /// Elements the members really have: Σ rows × their own lengths' product.
    pub real: usize,
}

impl Cost {
    fn of<J: Batchable>(job: &J) -> Cost {
        Cost {
            rows: job.rows(),
            lengths: job.lengths().to_vec(),
            real: job.rows().saturating_mul(product(job.lengths())),
        }
    }

    /// The cost once `job` joins.
    fn with<J: Batchable>(&self, job: &J) -> Cost {
        Cost {
            rows: self.rows.saturating_add(job.rows()),
            lengths: self
                .lengths
                .iter()
                .zip(job.lengths())
                .map(|(&a, &b)| a.max(b))
                .collect(),
            real: self
                .real
                .saturating_add(job.rows().saturating_mul(product(job.lengths()))),
        }
    }

    /// Elements of the batch once padded: rows × the product of the longest lengths.
    pub fn padded(&self) -> usize {
        self.rows.saturating_mul(product(&self.lengths))
    }

    /// The share of the padded elements that is padding.
    pub fn waste(&self) -> f64 {
        let padded = self.padded();
        if padded == 0 {
            return 0.0;
        }
        1.0 - self.real as f64 / padded as f64
    }

    fn fits(&self, limits: &Limits) -> bool {
        self.rows <= limits.max_rows
            && (limits.max_elements == 0 || self.padded() <= limits.max_elements)
            && self.waste() <= limits.max_waste
    }
}

fn product(lengths: &[usize]) -> usize {
    lengths.iter().fold(1usize, |acc, &l| acc.saturating_mul(l))
}

/// Takes the next batch from the front of `queue` (empty when `queue` is).
pub fn take_batch<J: Batchable>(queue: &mut VecDeque<J>, limits: &Limits) -> Vec<J> {
    let Some(first) = queue.pop_front() else {
        return Vec::new();
    };
    if first.lengths().is_empty() {
        return take_in_order(queue, first, limits.max_rows);
    }
    take_by_length(queue, first, limits)
}

/// Unpadded models: compatible jobs in queue order while they fit in `max_rows`.
fn take_in_order<J: Batchable>(queue: &mut VecDeque<J>, first: J, max_rows: usize) -> Vec<J> {
    let mut rows = first.rows();
    let mut batch = vec![first];
    if rows >= max_rows {
        return batch;
    }
    let mut rest = VecDeque::with_capacity(queue.len());
    while let Some(job) = queue.pop_front() {
        if !job.batches_with(&batch[0]) {
            rest.push_back(job);
        } else if rows + job.rows() <= max_rows {
            rows += job.rows();
            batch.push(job);
            if rows == max_rows {
                break;
            }
        } else {
            // First come, first served: a later job never overtakes one that does not fit.
            rest.push_back(job);
            break;
        }
    }
    rest.append(queue);
    *queue = rest;
    batch
}

/// Padded models: the nearest lengths first among the next `window` compatible jobs,
/// while rows, padded elements and waste stay within `limits`.
fn take_by_length<J: Batchable>(queue: &mut VecDeque<J>, first: J, limits: &Limits) -> Vec<J> {
    let mut cost = Cost::of(&first);
    if !cost.fits(limits) {
        return vec![first];
    }
    let distance = |job: &J| -> usize {
        job.lengths()
            .iter()
            .zip(first.lengths())
            .map(|(&a, &b)| a.abs_diff(b))
            .sum()
    };
    let mut candidates: Vec<(usize, usize)> = queue
        .iter()
        .enumerate()
        .filter(|(_, j)| j.batches_with(&first))
        .take(limits.window)
        .map(|(i, j)| (distance(j), i))
        .collect();
    // Stable on queue position: equal distances keep their order (FIFO within a shape).
    candidates.sort_unstable();
    let mut chosen = Vec::new();
    for (_, i) in candidates {
        let next = cost.with(&queue[i]);
        if !next.fits(limits) {
            break;
        }
        cost = next;
        chosen.push(i);
    }
    chosen.sort_unstable();
    let mut batch = Vec::with_capacity(chosen.len() + 1);
    batch.push(first);
    let mut rest = VecDeque::with_capacity(queue.len() - chosen.len());
    let mut next = chosen.iter().peekable();
    for (i, job) in std::mem::take(queue).into_iter().enumerate() {
        if next.next_if(|&&c| c == i).is_some() {
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *queue = rest;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A job of `rows` rows whose inputs have shape class `shape` (0: runs alone) and,
    /// for a padded model, `lengths` on its padded axes.
    #[derive(Debug, Clone, PartialEq)]
    struct J {
        id: usize,
        rows: usize,
        shape: u8,
        lengths: Vec<usize>,
    }

    fn j(id: usize, rows: usize, shape: u8) -> J {
        J {
            id,
            rows,
            shape,
            lengths: Vec::new(),
        }
    }

    /// A one-row job of a padded model with length `len`.
    fn p(id: usize, len: usize) -> J {
        J {
            lengths: vec![len],
            ..j(id, 1, 1)
        }
    }

    impl Batchable for J {
        fn rows(&self) -> usize {
            self.rows
        }
        fn batches_with(&self, first: &Self) -> bool {
            self.shape != 0 && self.shape == first.shape
        }
        fn lengths(&self) -> &[usize] {
            &self.lengths
        }
    }

    fn ids(jobs: &[J]) -> Vec<usize> {
        jobs.iter().map(|j| j.id).collect()
    }

    #[test]
    fn fills_up_to_max_batch_rows() {
        let mut q: VecDeque<J> = (0..10).map(|id| j(id, 3, 1)).collect();
        let b = take_batch(&mut q, &Limits::rows(8));
        assert_eq!(ids(&b), vec![0, 1]);
        assert_eq!(q.front().map(|j| j.id), Some(2));
    }

    #[test]
    fn a_large_job_goes_alone_and_shapes_do_not_mix() {
        let mut q = VecDeque::from(vec![j(0, 100, 1), j(1, 1, 1)]);
        assert_eq!(take_batch(&mut q, &Limits::rows(64)).len(), 1);
        let mut q = VecDeque::from(vec![j(0, 1, 1), j(1, 1, 2), j(2, 1, 1), j(3, 1, 2)]);
        let b = take_batch(&mut q, &Limits::rows(64));
        assert_eq!(ids(&b), vec![0, 2]);
        assert_eq!(ids(q.make_contiguous()), vec![1, 3]);
        assert_eq!(ids(&take_batch(&mut q, &Limits::rows(64))), vec![1, 3]);
    }

    #[test]
    fn jobs_that_run_alone_never_gather_others() {
        // Zero rows (a model without inputs) and "alone" jobs: one job per batch.
        let mut q = VecDeque::from(vec![j(0, 0, 0), j(1, 0, 0), j(2, 1, 0)]);
        for want in 0..3 {
            assert_eq!(ids(&take_batch(&mut q, &Limits::rows(64))), vec![want]);
        }
        assert!(take_batch(&mut q, &Limits::rows(64)).is_empty());
    }

    #[test]
    fn padded_batches_gather_similar_lengths_and_keep_the_rest_in_order() {
        // Lengths 10, 100, 11, 9, 100, 12: the front (10) takes 11, 9 and 12 (waste
        // 1 - 42/48 = 12.5%); the two 100s make the next batch.
        let lens = [10, 100, 11, 9, 100, 12];
        let mut q: VecDeque<J> = lens.iter().enumerate().map(|(i, &l)| p(i, l)).collect();
        let b = take_batch(&mut q, &Limits::rows(64));
        assert_eq!(ids(&b), vec![0, 2, 3, 5]);
        assert_eq!(ids(q.make_contiguous()), vec![1, 4]);
        assert_eq!(ids(&take_batch(&mut q, &Limits::rows(64))), vec![1, 4]);
    }

    #[test]
    fn padded_batches_respect_the_element_budget_and_the_waste_bound() {
        // 8 jobs of length 100 under a budget of 500 elements: 5 per batch.
        let mut q: VecDeque<J> = (0..8).map(|i| p(i, 100)).collect();
        let limits = Limits {
            max_elements: 500,
            ..Limits::rows(64)
        };
        assert_eq!(take_batch(&mut q, &limits).len(), 5);
        // Lengths 4 and 8 alone: padding 4 to 8 wastes 4/16 = 25%, allowed; 3 and 8
        // would waste 5/16 > 25%: each goes alone.
        let mut q = VecDeque::from(vec![p(0, 4), p(1, 8)]);
        assert_eq!(take_batch(&mut q, &Limits::rows(64)).len(), 2);
        let mut q = VecDeque::from(vec![p(0, 3), p(1, 8)]);
        assert_eq!(ids(&take_batch(&mut q, &Limits::rows(64))), vec![0]);
        // A job over the budget on its own still runs, alone.
        let mut q = VecDeque::from(vec![p(0, 1000), p(1, 1000)]);
        assert_eq!(ids(&take_batch(&mut q, &limits)), vec![0]);
    }

    #[test]
    fn the_window_bounds_reordering() {
        // The one job of the front's length sits beyond a window of 2: not taken.
        let mut q = VecDeque::from(vec![p(0, 5), p(1, 50), p(2, 60), p(3, 5)]);
        let limits = Limits {
            window: 2,
            ..Limits::rows(64)
        };
        assert_eq!(ids(&take_batch(&mut q, &limits)), vec![0]);
    }

    fn check_partition(jobs: &[J], limits: &Limits) -> Result<(), TestCaseError> {
        let mut q: VecDeque<J> = jobs.iter().cloned().collect();
        let mut seen = Vec::new();
        while let Some(front) = q.front().cloned() {
            // Where each job stood among the front's compatible jobs, before the take.
            let positions: Vec<(usize, usize)> = q
                .iter()
                .skip(1)
                .filter(|j| j.batches_with(&front))
                .enumerate()
                .map(|(pos, j)| (j.id, pos))
                .collect();
            let b = take_batch(&mut q, limits);
            prop_assert_eq!(b[0].id, front.id, "the front job is always served");
            if b.len() > 1 {
                let mut cost = Cost::of(&b[0]);
                for m in &b[1..] {
                    prop_assert!(m.batches_with(&b[0]), "shapes never mix");
                    let pos = positions.iter().find(|(id, _)| *id == m.id).map(|p| p.1);
                    prop_assert!(
                        pos.is_some_and(|p| p < limits.window),
                        "reordering stays in the window"
                    );
                    cost = cost.with(m);
                }
                prop_assert!(cost.rows <= limits.max_rows);
                prop_assert!(limits.max_elements == 0 || cost.padded() <= limits.max_elements);
                prop_assert!(cost.waste() <= limits.max_waste + 1e-12);
            }
            seen.extend(b);
        }
        prop_assert_eq!(seen.len(), jobs.len());
        // FIFO within a shape: jobs of one class and lengths come out in arrival order.
        let mut classes: Vec<(u8, Vec<usize>)> =
            jobs.iter().map(|j| (j.shape, j.lengths.clone())).collect();
        classes.dedup();
        for (shape, lengths) in classes {
            let ids: Vec<usize> = seen
                .iter()
                .filter(|j| j.shape == shape && j.lengths == lengths)
                .map(|j| j.id)
                .collect();
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            prop_assert_eq!(ids, sorted);
        }
        Ok(())
    }

    proptest! {
        /// Unpadded: draining the queue batch by batch loses nothing, duplicates
        /// nothing, keeps each shape's order, never mixes shapes, never exceeds
        /// max_batch unless a job alone does, always serves the front job.
        #[test]
        fn batches_partition_the_queue(
            jobs in proptest::collection::vec((0usize..50, 0u8..4), 0..60),
            max_batch in 1usize..64,
        ) {
            let jobs: Vec<J> = jobs.iter().enumerate().map(|(id, &(rows, shape))| j(id, rows, shape)).collect();
            check_partition(&jobs, &Limits::rows(max_batch))?;
        }

        /// Padded: the same, plus every batch within the element budget and the waste
        /// bound, and no job taken from beyond the window.
        #[test]
        fn padded_batches_partition_the_queue_within_their_bounds(
            jobs in proptest::collection::vec((1usize..8, 1u8..3, proptest::collection::vec(1usize..200, 1..3)), 0..80),
            max_rows in 1usize..64,
            max_elements in prop_oneof![Just(0usize), 100usize..5000],
            window in 1usize..40,
            max_waste in 0.0f64..0.6,
        ) {
            // One padded-axis count per shape class, as one model version would have.
            let jobs: Vec<J> = jobs
                .into_iter()
                .enumerate()
                .map(|(id, (rows, shape, mut lengths))| {
                    lengths.truncate(usize::from(shape));
                    lengths.resize(usize::from(shape), 1);
                    J { id, rows, shape, lengths }
                })
                .collect();
            let limits = Limits { max_rows, max_elements, window, max_waste };
            check_partition(&jobs, &limits)?;
        }
    }
}
