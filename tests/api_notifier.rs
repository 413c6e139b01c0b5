//! The long-poll waiter registry the front door relies on: every waiter deregisters,
//! even when the waiters of one job are dropped at the same moment on different
//! threads (as they are when the job's completion wakes them all).
//!
//! `Waiter::drop` checks `receiver_count() <= 1` under the lock but drops its own
//! receiver only after releasing it: two waiters of one job dropped together can both
//! see the other still subscribed, and the job's entry then stays forever
//! (`Notifier::waiting()` never returns to 0; the map grows). Fix: in `drop`, replace
//! `self.rx` with a fresh receiver while holding the lock, then remove the entry when
//! `receiver_count() == 0`.

use std::sync::{Arc, Barrier};

use inferq::queue::notify::Notifier;

#[test]
fn waiters_dropped_at_once_leave_no_entry_behind() {
    const ROUNDS: usize = 20_000;
    let notifier = Notifier::default();
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (n, b) = (notifier.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                for i in 0..ROUNDS {
                    let w = n.register("m", &format!("job-{i}"));
                    b.wait(); // both hold a waiter on job-i
                    drop(w); // and drop it together
                    b.wait();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(
        notifier.waiting(),
        0,
        "jobs still registered after every waiter dropped"
    );
}
