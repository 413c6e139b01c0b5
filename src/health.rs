//! What this process cannot serve any more, for readiness: a model whose inference
//! threads are all gone is listed here, and `/v2/health/ready` on the metrics listener
//! answers 503 naming it, so an orchestrator replaces the process instead of leaving
//! it `ready` with a model it does not read (AUDIT D2, D28).

use std::collections::BTreeMap;
use std::sync::Mutex;

static DOWN: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// Records that `model` is no longer served by this process, and why.
pub fn model_down(model: &str, reason: &str) {
    DOWN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(model.to_owned(), reason.to_owned());
}

/// Models this process stopped serving, with the reason each.
pub fn models_down() -> BTreeMap<String, String> {
    DOWN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}
