//! What keeps slow or greedy clients from starving the others (AUDIT D3, D11): a
//! deadline on every request body, a global budget of body bytes in flight, and a
//! cap on connections per peer address. Header deadlines and the global connection
//! cap are in [`super::serve`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;
use hyper::body::Body;
use hyper::header;

use super::ApiError;
use crate::metrics::metrics;

/// Request-body bytes held by all requests at once, against a cap. Each request
/// reserves what it announces (Content-Length) before reading, or what arrives of a
/// chunked body before buffering it, so memory is bounded by the cap rather than by
/// connections × body limit.
#[derive(Debug)]
pub(super) struct BodyBudget {
    used: AtomicUsize,
    cap: usize,
}

/// The bytes one request holds; given back on drop.
#[derive(Debug)]
pub(super) struct Held<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl BodyBudget {
    pub(super) fn new(cap: usize) -> BodyBudget {
        BodyBudget {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    /// Bytes held now.
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn hold(&self) -> Held<'_> {
        Held {
            budget: self,
            bytes: 0,
        }
    }
}

impl Held<'_> {
    /// Grows this request's share to `total` bytes; 503 when the budget has not that
    /// much left (nothing is taken then).
    fn grow_to(&mut self, total: usize) -> Result<(), ApiError> {
        let Some(more) = total.checked_sub(self.bytes).filter(|&m| m > 0) else {
            return Ok(());
        };
        let cap = self.budget.cap;
        self.budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|&n| n <= cap)
            })
            .map_err(|_| {
                ApiError::Unavailable(format!(
                    "the front door already holds its limit of {cap} request-body bytes in flight; retry later"
                ))
            })?;
        self.bytes = total;
        metrics()
            .http_body_bytes_in_flight
            .add(i64::try_from(more).unwrap_or(i64::MAX));
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        metrics()
            .http_body_bytes_in_flight
            .sub(i64::try_from(self.bytes).unwrap_or(i64::MAX));
    }
}

/// How a body may be read: its size cap, its deadline, the shared byte budget.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyLimits<'a> {
    pub(super) max_bytes: usize,
    pub(super) timeout: Duration,
    pub(super) budget: &'a BodyBudget,
}

/// A request body read whole, with the share of the budget it holds.
#[derive(Debug)]
pub(super) struct ReadBody<'a> {
    pub(super) parts: hyper::http::request::Parts,
    pub(super) body: Bytes,
    /// Released when the body is no longer needed (after the submit).
    pub(super) _held: Held<'a>,
}

/// Reads a body up to `limits.max_bytes`: 413 past it (by Content-Length or while
/// streaming), 408 when the whole body has not arrived within `limits.timeout` of the
/// start, 503 when the front door's byte budget cannot take it.
pub(super) async fn read_body<B>(
    req: Request<B>,
    limits: BodyLimits<'_>,
) -> Result<ReadBody<'_>, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = limits.max_bytes;
    let until = tokio::time::Instant::now() + limits.timeout;
    let too_large = || ApiError::TooLarge(format!("request body over the limit of {limit} bytes"));
    let too_slow = || {
        ApiError::Timeout(format!(
            "the request body did not arrive within {} ms",
            limits.timeout.as_millis()
        ))
    };
    // An oversized body is read and dropped up to this much, as long as it keeps
    // arriving, so a client still sending gets its 413 instead of a reset connection;
    // beyond the cap, or when the client pauses, the answer goes at once.
    let drain_cap = limit.saturating_mul(4).min(64 << 20);
    let drain_pause = Duration::from_millis(200);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|len| len > drain_cap) {
        return Err(too_large());
    }
    let over = declared.is_some_and(|len| len > limit);
    let mut held = limits.budget.hold();
    // Only bytes that are kept count: an oversized body is dropped as it arrives.
    if !over {
        held.grow_to(declared.unwrap_or(0))?;
    }
    let (parts, body) = req.into_parts();
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    loop {
        let draining = over || seen > limit;
        let wait_until = if draining {
            until.min(tokio::time::Instant::now() + drain_pause)
        } else {
            until
        };
        let next = match tokio::time::timeout_at(wait_until, body.frame()).await {
            Ok(next) => next,
            Err(_) if draining => return Err(too_large()),
            Err(_) => return Err(too_slow()),
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| {
            ApiError::Invalid(format!("cannot read the request body: {}", e.into()))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > drain_cap {
            return Err(too_large());
        }
        if seen <= limit {
            held.grow_to(seen)?;
            buf.extend_from_slice(&data);
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    Ok(ReadBody {
        parts,
        body: buf.freeze(),
        _held: held,
    })
}

/// Open connections per peer address, against a cap (0: none), so that one host
/// cannot take every connection slot of the front door.
#[derive(Debug)]
pub(super) struct PeerCounts {
    open: Mutex<HashMap<IpAddr, usize>>,
    cap: usize,
}

/// One connection's place in its peer's count; given back on drop.
#[derive(Debug)]
pub(super) struct PeerSlot {
    counts: Arc<PeerCounts>,
    ip: IpAddr,
}

impl PeerCounts {
    pub(super) fn new(cap: usize) -> Arc<PeerCounts> {
        Arc::new(PeerCounts {
            open: Mutex::new(HashMap::new()),
            cap,
        })
    }

    /// A slot for a new connection from `ip`; `None` when that peer is at the cap.
    pub(super) fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        if self.cap == 0 {
            return Some(PeerSlot {
                counts: Arc::clone(self),
                ip,
            });
        }
        // A panic cannot leave the map half-updated: the guarded sections only count.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if self.counts.cap == 0 {
            return;
        }
        let mut open = self
            .counts
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_cap_and_frees_on_drop() {
        let budget = BodyBudget::new(100);
        let mut a = budget.hold();
        a.grow_to(60).expect("60 of 100");
        let mut b = budget.hold();
        assert!(b.grow_to(41).is_err(), "60 + 41 is over 100");
        assert_eq!(budget.used(), 60, "a refused grow takes nothing");
        b.grow_to(40).expect("60 + 40 fits");
        a.grow_to(10).expect("shrinking is a no-op");
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn peers_are_capped_each_and_slots_come_back() {
        let counts = PeerCounts::new(2);
        let (one, two): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a = counts.enter(one).expect("first");
        let _b = counts.enter(one).expect("second");
        assert!(counts.enter(one).is_none(), "third from one peer");
        let _c = counts.enter(two).expect("another peer");
        drop(a);
        assert!(counts.enter(one).is_some(), "a freed slot is reused");
        let unlimited = PeerCounts::new(0);
        let held: Vec<_> = (0..10).filter_map(|_| unlimited.enter(one)).collect();
        assert_eq!(held.len(), 10, "0 means no cap");
    }
}
