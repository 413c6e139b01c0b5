//! Fault injection for the test suite: make inference on a model panic, or make its
//! inference threads end, so tests can prove what the worker does when that happens
//! (no job lost, the culprit dead-lettered, the model still served, readiness honest).
//! Nothing is armed unless a test arms it; unarmed, each ORT call pays one relaxed
//! atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::protocol::{Tensor, TensorData};

/// A fault, for every version of one model (by name).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Any ORT call of `model` whose inputs hold an element equal to `value` panics
    /// (like a bug reached by one job's data).
    PanicOnValue {
        /// Model name.
        model: String,
        /// The poison element.
        value: f64,
    },
    /// The next batch for `model` makes its inference thread end without answering (a
    /// thread that is gone for good).
    EndThread {
        /// Model name.
        model: String,
    },
    /// Every ORT call of `model` takes at least `ms` longer (a slow model).
    SlowRun {
        /// Model name.
        model: String,
        /// Extra time per call.
        ms: u64,
    },
}

static ARMED: AtomicBool = AtomicBool::new(false);
static FAULTS: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

/// Arms `fault` for the rest of the process (tests use unique model names).
pub fn arm(fault: Fault) {
    if let Ok(mut f) = FAULTS.lock() {
        f.push(fault);
        ARMED.store(true, Ordering::Relaxed);
    }
}

fn any(pred: impl Fn(&Fault) -> bool) -> bool {
    ARMED.load(Ordering::Relaxed) && FAULTS.lock().is_ok_and(|f| f.iter().any(pred))
}

/// `name` of a `name@version` label.
fn name(label: &str) -> &str {
    label.split_once('@').map_or(label, |(n, _)| n)
}

/// Panics when a [`Fault::PanicOnValue`] matches this call; sleeps for a
/// [`Fault::SlowRun`].
pub(crate) fn check_run(label: &str, inputs: &[Tensor]) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    let hit = any(|f| match f {
        Fault::PanicOnValue { model, value } => {
            model == name(label) && inputs.iter().any(|t| holds(&t.data, *value))
        }
        Fault::EndThread { .. } | Fault::SlowRun { .. } => false,
    });
    assert!(!hit, "injected fault: a panic in inference of {label}");
    let slow = FAULTS.lock().ok().and_then(|f| {
        f.iter().find_map(|x| match x {
            Fault::SlowRun { model, ms } if model == name(label) => Some(*ms),
            _ => None,
        })
    });
    if let Some(ms) = slow {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// True when a [`Fault::EndThread`] is armed for this model (it is used up).
pub(crate) fn take_end_thread(model: &str) -> bool {
    if !any(|f| matches!(f, Fault::EndThread { model: m } if m == model)) {
        return false;
    }
    FAULTS.lock().is_ok_and(|mut f| {
        let before = f.len();
        f.retain(|x| !matches!(x, Fault::EndThread { model: m } if m == model));
        f.len() < before
    })
}

fn holds(data: &TensorData, value: f64) -> bool {
    match data {
        TensorData::Bool(v) => v.iter().any(|&x| f64::from(u8::from(x)) == value),
        TensorData::Int32(v) => v.iter().any(|&x| f64::from(x) == value),
        TensorData::Int64(v) => v.iter().any(|&x| x as f64 == value),
        TensorData::Fp32(v) => v.iter().any(|&x| f64::from(x) == value),
        TensorData::Fp64(v) => v.contains(&value),
    }
}
