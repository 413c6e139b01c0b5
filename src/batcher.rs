//! The batching policy, as a pure function over the jobs waiting in a worker.
//!
//! Rows, not jobs, are counted. A batch takes jobs from the front, in order, while
//! they fit in `max_batch` rows and share the first job's version; a job larger than `max_batch`
//! goes alone (the runtime runs it `max_batch` rows at a time and reassembles its
//! outputs in order). Jobs skipped for another version keep their place.
//!
//! *When* a batch forms is the worker's business: as soon as an inference thread is
//! free it takes whatever is waiting, so a lone job never waits for a timer; with
//! `max_wait` set it waits that long from the first job for more rows.

use std::collections::VecDeque;

/// What the policy needs to know about a waiting job.
pub trait Batchable {
    /// Rows in the job's batch dimension.
    fn rows(&self) -> usize;
    /// The model version it runs on.
    fn version(&self) -> u64;
}

/// Rows waiting in `queue`.
pub fn waiting_rows<J: Batchable>(queue: &VecDeque<J>) -> usize {
    queue.iter().map(Batchable::rows).sum()
}

/// Takes the next batch from the front of `queue` (empty when `queue` is).
pub fn take_batch<J: Batchable>(queue: &mut VecDeque<J>, max_batch: usize) -> Vec<J> {
    let Some(first) = queue.front() else {
        return Vec::new();
    };
    let version = first.version();
    if first.rows() >= max_batch {
        return queue.pop_front().into_iter().collect();
    }
    let mut batch = Vec::new();
    let mut rows = 0;
    let mut rest = VecDeque::with_capacity(queue.len());
    while let Some(job) = queue.pop_front() {
        if job.version() != version {
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

    #[derive(Debug, Clone, PartialEq)]
    struct J {
        id: usize,
        rows: usize,
        version: u64,
    }

    impl Batchable for J {
        fn rows(&self) -> usize {
            self.rows
        }
        fn version(&self) -> u64 {
            self.version
        }
    }

    #[test]
    fn fills_up_to_max_batch_rows() {
        let mut q: VecDeque<J> = (0..10)
            .map(|id| J {
                id,
                rows: 3,
                version: 1,
            })
            .collect();
        let b = take_batch(&mut q, 8);
        assert_eq!(b.iter().map(|j| j.id).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(q.front().map(|j| j.id), Some(2));
    }

    #[test]
    fn a_large_job_goes_alone_and_versions_do_not_mix() {
        let mut q = VecDeque::from(vec![
            J {
                id: 0,
                rows: 100,
                version: 1,
            },
            J {
                id: 1,
                rows: 1,
                version: 1,
            },
        ]);
        assert_eq!(take_batch(&mut q, 64).len(), 1);
        let mut q = VecDeque::from(vec![
            J {
                id: 0,
                rows: 1,
                version: 1,
            },
            J {
                id: 1,
                rows: 1,
                version: 2,
            },
            J {
                id: 2,
                rows: 1,
                version: 1,
            },
        ]);
        let b = take_batch(&mut q, 64);
        assert_eq!(b.iter().map(|j| j.id).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(q.iter().map(|j| j.id).collect::<Vec<_>>(), vec![1]);
    }

    proptest! {
        /// Draining the queue batch by batch loses nothing, duplicates nothing, keeps
        /// each version's order, never exceeds max_batch unless a job alone does.
        #[test]
        fn batches_partition_the_queue(
            jobs in proptest::collection::vec((1usize..50, 1u64..3), 0..60),
            max_batch in 1usize..64,
        ) {
            let mut q: VecDeque<J> = jobs.iter().enumerate().map(|(id, &(rows, version))| J { id, rows, version }).collect();
            let mut seen = Vec::new();
            let mut guard = 0;
            while !q.is_empty() {
                let b = take_batch(&mut q, max_batch);
                prop_assert!(!b.is_empty());
                let rows: usize = b.iter().map(|j| j.rows).sum();
                prop_assert!(rows <= max_batch || b.len() == 1);
                prop_assert!(b.iter().all(|j| j.version == b[0].version));
                seen.extend(b);
                guard += 1;
                prop_assert!(guard <= jobs.len());
            }
            prop_assert_eq!(seen.len(), jobs.len());
            for v in 1..3u64 {
                let ids: Vec<usize> = seen.iter().filter(|j| j.version == v).map(|j| j.id).collect();
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                prop_assert_eq!(ids, sorted);
            }
        }
    }
}
