//! The batching policy (`inferq::batcher::take_batch`) over a backlog of 1,000 waiting
//! jobs: how long it takes to cut the backlog into batches of 64 rows, with one
//! version and shape (the common case) and with two interleaved (jobs skipped for
//! another version or shape keep their place).

use std::collections::VecDeque;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use inferq::batcher::{Batchable, Limits, take_batch};

#[derive(Debug, Clone)]
struct Job {
    rows: usize,
    group: u64,
}

impl Batchable for Job {
    fn rows(&self) -> usize {
        self.rows
    }
    fn batches_with(&self, first: &Self) -> bool {
        self.group == first.group
    }
}

fn backlog(versions: u64) -> VecDeque<Job> {
    (0..1000u64)
        .map(|i| Job {
            rows: 1 + (i % 3) as usize,
            group: 1 + i % versions,
        })
        .collect()
}

fn drain(mut q: VecDeque<Job>) -> usize {
    let mut batches = 0;
    while !q.is_empty() {
        black_box(take_batch(&mut q, &Limits::rows(64)));
        batches += 1;
    }
    batches
}

fn batcher(c: &mut Criterion) {
    let mut g = c.benchmark_group("take_batch");
    g.throughput(Throughput::Elements(1000));
    for versions in [1u64, 2] {
        g.bench_function(format!("1000_jobs_{versions}_version(s)"), |b| {
            b.iter_batched(|| backlog(versions), drain, BatchSize::SmallInput)
        });
    }
    g.bench_function("one_batch_from_1000", |b| {
        b.iter_batched(
            || backlog(1),
            |mut q| take_batch(&mut q, &Limits::rows(64)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, batcher);
criterion_main!(benches);
