//! The batching policy, as a pure function over the jobs waiting in a worker.
//!
//! Rows, not jobs, are counted. A batch takes jobs from the front, in order, while
//! they fit in `max_batch` rows and can share one ORT call with the first job (same
//! version, and every input agreeing on every dimension but the batch one: stacking
//! jobs of other shapes would mix one job's numbers into another's answer). A job
//! larger than `max_batch` goes alone (the runtime runs it `max_batch` rows at a time
//! and reassembles its outputs in order). Jobs skipped for another version or shape
//! keep their place, and the front job is always taken, so no shape starves.
//!
//! *When* a batch forms is the worker's business: as soon as an inference thread is
//! free it takes whatever is waiting, so a lone job never waits for a timer; with
//! `max_wait` set it waits that long from the first job for more rows.

use std::collections::VecDeque;

/// What the policy needs to know about a waiting job.
pub trait Batchable {
    /// Rows in the job's batch dimension.
    fn rows(&self) -> usize;
    /// Whether this job may be stacked with `first` in one ORT call. Must be an
    /// equivalence on jobs that batch at all; a job that must run alone says `false`
    /// to every other job.
    fn batches_with(&self, first: &Self) -> bool;
}

/// Rows waiting in `queue`.
pub fn waiting_rows<J: Batchable>(queue: &VecDeque<J>) -> usize {
    queue.iter().map(Batchable::rows).sum()
}

/// Takes the next batch from the front of `queue` (empty when `queue` is).
pub fn take_batch<J: Batchable>(queue: &mut VecDeque<J>, max_batch: usize) -> Vec<J> {
    let Some(first) = queue.pop_front() else {
        return Vec::new();
    };
    let mut rows = first.rows();
    let mut batch = vec![first];
    if rows >= max_batch {
        return batch;
    }
    let mut rest = VecDeque::with_capacity(queue.len());
    while let Some(job) = queue.pop_front() {
        if !job.batches_with(&batch[0]) {
            rest.push_back(job);
        } else if rows + job.rows() <= max_batch {
            rows += job.rows();
            batch.push(job);
            if rows == max_batch {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A job of `rows` rows whose inputs have shape class `shape` (0: runs alone).
    #[derive(Debug, Clone, PartialEq)]
    struct J {
        id: usize,
        rows: usize,
        shape: u8,
    }

    fn j(id: usize, rows: usize, shape: u8) -> J {
        J { id, rows, shape }
    }

    impl Batchable for J {
        fn rows(&self) -> usize {
            self.rows
        }
        fn batches_with(&self, first: &Self) -> bool {
            self.shape != 0 && self.shape == first.shape
        }
    }

    fn ids(jobs: &[J]) -> Vec<usize> {
        jobs.iter().map(|j| j.id).collect()
    }

    #[test]
    fn fills_up_to_max_batch_rows() {
        let mut q: VecDeque<J> = (0..10).map(|id| j(id, 3, 1)).collect();
        let b = take_batch(&mut q, 8);
        assert_eq!(ids(&b), vec![0, 1]);
        assert_eq!(q.front().map(|j| j.id), Some(2));
    }

    #[test]
    fn a_large_job_goes_alone_and_shapes_do_not_mix() {
        let mut q = VecDeque::from(vec![j(0, 100, 1), j(1, 1, 1)]);
        assert_eq!(take_batch(&mut q, 64).len(), 1);
        let mut q = VecDeque::from(vec![j(0, 1, 1), j(1, 1, 2), j(2, 1, 1), j(3, 1, 2)]);
        let b = take_batch(&mut q, 64);
        assert_eq!(ids(&b), vec![0, 2]);
        assert_eq!(ids(q.make_contiguous()), vec![1, 3]);
        assert_eq!(ids(&take_batch(&mut q, 64)), vec![1, 3]);
    }

    #[test]
    fn jobs_that_run_alone_never_gather_others() {
        // Zero rows (a model without inputs) and "alone" jobs: one job per batch.
        let mut q = VecDeque::from(vec![j(0, 0, 0), j(1, 0, 0), j(2, 1, 0)]);
        for want in 0..3 {
            assert_eq!(ids(&take_batch(&mut q, 64)), vec![want]);
        }
        assert!(take_batch(&mut q, 64).is_empty());
    }

    proptest! {
        /// Draining the queue batch by batch loses nothing, duplicates nothing, keeps
        /// each shape's order, never mixes shapes, never exceeds max_batch unless a job
        /// alone does, and always serves the front job (no shape starves).
        #[test]
        fn batches_partition_the_queue(
            jobs in proptest::collection::vec((0usize..50, 0u8..4), 0..60),
            max_batch in 1usize..64,
        ) {
            let mut q: VecDeque<J> = jobs.iter().enumerate().map(|(id, &(rows, shape))| j(id, rows, shape)).collect();
            let mut seen = Vec::new();
            while let Some(front) = q.front().map(|j| j.id) {
                let b = take_batch(&mut q, max_batch);
                prop_assert_eq!(b[0].id, front);
                let rows: usize = b.iter().map(|j| j.rows).sum();
                prop_assert!(rows <= max_batch || b.len() == 1);
                prop_assert!(b.len() == 1 || b.iter().all(|j| j.shape != 0 && j.shape == b[0].shape));
                seen.extend(b);
            }
            prop_assert_eq!(seen.len(), jobs.len());
            for shape in 0..4u8 {
                let ids: Vec<usize> = seen.iter().filter(|j| j.shape == shape).map(|j| j.id).collect();
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                prop_assert_eq!(ids, sorted);
            }
        }
    }
}
