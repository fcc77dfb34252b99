//! How many ReceiveMessage calls a backend keeps in flight: adapted to what the endpoint and the database sustain.
//!
//! One backend's receive rate is bounded by `in flight × 10 / round trip` (each ReceiveMessage returns at most 10
//! messages), so a fixed number that saturates a loopback endpoint (~3 ms round trips) caps a backend at real SQS
//! latencies (5–30 ms). The limit therefore starts at `sqs_ingest.receive_concurrency` and moves by additive
//! increase, multiplicative decrease, the rule TCP congestion control uses for the same problem (an unknown
//! capacity that must be found without being overrun):
//!
//! * **grow** after a window of receives in which the main thread spent at least [`NETWORK_BOUND`] of the time
//!   waiting for answers (receives were the bottleneck): doubling at first (TCP's slow start), by one after the
//!   first grow that did not pay, up to the cap (`sqs_ingest.max_receive_concurrency`);
//! * **step back** to where it was when a grow did not pay (the rate did not rise by [`GAIN`] of what the extra
//!   receives could add), and stop probing for [`REST`] windows;
//! * **step back by one** when the database is the bottleneck: the main thread hardly waited for the network
//!   (receives were answered while it stored; more in flight would only wait in memory, invisible on the queue);
//! * **halve** on throttling (SQS says it is overrun) and on an empty receive (the queue is drained: polls beyond
//!   one only cost requests).
//!
//! The first window of a new controller only measures: it pays for new connections, plans and the call's first
//! statements, so a grow judged against it would look paid on an endpoint that more receives do not speed up.
//! Likewise the window that judges a grow starts only after one round of receives at the new limit: until each
//! added receive has answered once, the new slots were still opening their connections (a TLS handshake is two
//! or three round trips against real SQS), so a grow judged over that round would look unpaid where it pays.
//!
//! Pure: the caller passes each finished receive and elapsed seconds, so every rule is unit-tested without a clock.

/// Share of the most a grow from `k` to `m` receives in flight can add (`(m - k) / k` of the rate) that counts as
/// "the grow paid": half of it. Less is within a window's noise, and not worth the requests.
pub const GAIN: f64 = 0.5;
/// Windows without probing after a grow that did not pay.
pub const REST: u32 = 4;
/// Share of a window's time the main thread must spend waiting for receives for the network to count as the
/// bottleneck.
pub const NETWORK_BOUND: f64 = 0.2;
/// A window ends after this many finished receives per receive in flight (so each window sees every slot
/// answer a few times), and lasts at least [`MIN_WINDOW_S`] (several batches stored: a window with one more store
/// than the last would otherwise look slower).
const RECEIVES_PER_SLOT: u32 = 4;
const MIN_WINDOW_S: f64 = 0.25;
/// A window in progress goes on into the next call when that call starts within this many seconds of the last
/// receive (a worker's or the drain procedure's next batch: 100 messages are 10 receives, fewer than one window at
/// 4 in flight, so windows cut at each call would never end); the time between the calls is not counted.
pub const CARRY_GAP_S: f64 = 1.0;

#[derive(Debug, Clone)]
pub struct ReceiveConcurrency {
    limit: usize,
    cap: usize,
    /// The highest limit so far (for the benchmark's report).
    peak: usize,
    /// Window: messages, finished receives, seconds the main thread waited for them, start time (seconds).
    messages: u64,
    receives: u32,
    waited_s: f64,
    started_s: f64,
    /// When the last receive finished (seconds, the caller's clock).
    last_s: f64,
    /// Rate of the previous window (messages/s); the limit before the grow at its end, if it grew (where a grow
    /// that does not pay goes back to).
    last_rate: Option<f64>,
    grew_from: Option<usize>,
    resting: u32,
    /// Doubling (TCP's slow start) until the first grow that does not pay; one at a time after that.
    slow_start: bool,
    /// Start and cap equal: the number stays where it is, except that throttling still halves it.
    fixed: bool,
    /// The first window of a new controller only measures: it pays for new connections, plans and the call's
    /// first statements, so a grow compared against it would look paid when it was not.
    warming: bool,
    /// Receives still to finish after a grow before the window that judges it starts: as many as the new limit,
    /// so every added receive (started after those already in flight) has answered once and opened its
    /// connection. Cleared by a halving and by a call that cannot carry the window (its first window only
    /// measures, which covers the same round).
    settling: u32,
}

impl ReceiveConcurrency {
    /// Starts at `start` receives in flight, never above `cap` (both at least 1); `now_s` is the caller's clock.
    pub fn new(start: usize, cap: usize, now_s: f64) -> Self {
        let cap = cap.max(1);
        let limit = start.clamp(1, cap);
        ReceiveConcurrency {
            limit,
            cap,
            peak: limit,
            messages: 0,
            receives: 0,
            waited_s: 0.0,
            started_s: now_s,
            last_s: now_s,
            last_rate: None,
            grew_from: None,
            resting: 0,
            slow_start: true,
            fixed: start >= cap,
            warming: true,
            settling: 0,
        }
    }

    /// Goes on where an earlier call left off (its rate, its last grow, its probing state) within a possibly
    /// changed `start` (never below it) and `cap`; `now_s` is on the same clock as the earlier call's. A call
    /// starting within [`CARRY_GAP_S`] of the end of the last one ([`ReceiveConcurrency::pause`]) at the same
    /// limit continues the window in progress (the gap is not counted); otherwise a fresh window starts at
    /// `now_s` and only measures (like a new controller's first), discarding what an earlier call did not
    /// complete. Either way a grow is only ever kept after a whole window measured it.
    pub fn resume(mut self, start: usize, cap: usize, now_s: f64) -> Self {
        let cap = cap.max(1);
        let start = start.clamp(1, cap);
        if self.cap != cap || start >= cap {
            return Self::new(start, cap, now_s);
        }
        let was_fixed = std::mem::replace(&mut self.fixed, false);
        let limit = self.limit.clamp(start, cap);
        let gap = now_s - self.last_s;
        if !was_fixed && limit == self.limit && (0.0..=CARRY_GAP_S).contains(&gap) {
            self.started_s += gap;
            self.last_s = now_s;
        } else {
            self.restart(now_s);
            self.warming = true;
            self.settling = 0;
        }
        self.limit = limit;
        self.grew_from = self.grew_from.map(|from| from.clamp(start, self.limit));
        self.peak = self.limit;
        self
    }

    /// The call ends at `now_s` (after storing its last batch): the time until the next call's
    /// [`ReceiveConcurrency::resume`] is the gap a carried window does not count.
    pub fn pause(&mut self, now_s: f64) {
        if now_s > self.last_s {
            self.last_s = now_s;
        }
    }

    /// Receives to keep in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The highest limit since [`ReceiveConcurrency::new`].
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// One receive finished with `messages` messages; the main thread blocked `waited_s` seconds for it (0 if it
    /// was answered before the main thread came for it). Returns the new limit.
    pub fn received(&mut self, messages: usize, waited_s: f64, now_s: f64) -> usize {
        if messages == 0 {
            return self.empty(now_s);
        }
        if self.fixed {
            return self.limit;
        }
        self.last_s = now_s;
        if self.settling > 0 {
            self.settling -= 1;
            if self.settling == 0 {
                self.restart(now_s);
            }
            return self.limit;
        }
        self.messages += messages as u64;
        self.receives += 1;
        self.waited_s += waited_s.max(0.0);
        let elapsed = now_s - self.started_s;
        if self.receives < RECEIVES_PER_SLOT * self.limit as u32 || elapsed < MIN_WINDOW_S {
            return self.limit;
        }
        let rate = self.messages as f64 / elapsed;
        if std::mem::take(&mut self.warming) {
            // A grow still waiting for its verdict is judged against the rate before it, not this cold window.
            if self.grew_from.is_none() {
                self.last_rate = Some(rate);
            }
            self.restart(now_s);
            return self.limit;
        }
        let network_bound = self.waited_s >= NETWORK_BOUND * elapsed;
        // A grow from `from` to `limit` could raise the rate by at most (limit - from) / from.
        let unpaid = match (self.grew_from.take(), self.last_rate) {
            (Some(from), Some(last)) => {
                let possible = (self.limit - from) as f64 / from as f64;
                (rate <= last * (1.0 + GAIN * possible)).then_some(from)
            }
            _ => None,
        };
        if let Some(from) = unpaid {
            // The last grow did not raise the rate: back to where it was, one at a time from now on, and rest.
            self.limit = from;
            self.slow_start = false;
            self.resting = REST;
        } else if !network_bound {
            // The database is the bottleneck: receives wait in memory for it. One fewer in flight.
            self.limit = (self.limit - 1).max(1);
            self.slow_start = false;
        } else if self.resting > 0 {
            self.resting -= 1;
        } else if self.limit < self.cap {
            let from = self.limit;
            self.limit = if self.slow_start { (from * 2).min(self.cap) } else { from + 1 };
            self.peak = self.peak.max(self.limit);
            self.grew_from = Some(from);
            self.settling = self.limit as u32;
        }
        self.last_rate = Some(rate);
        self.restart(now_s);
        self.limit
    }

    /// A receive came back empty: the queue looks drained. Halves the limit.
    pub fn empty(&mut self, now_s: f64) -> usize {
        if self.fixed {
            return self.limit;
        }
        self.halve(now_s)
    }

    /// Starts a new window at `now_s` (the time since the last receive was not spent receiving, e.g. a long poll
    /// that confirmed an empty queue).
    pub fn skip_window(&mut self, now_s: f64) {
        self.restart(now_s);
    }

    /// SQS throttled a receive. Halves the limit.
    pub fn throttled(&mut self, now_s: f64) -> usize {
        self.halve(now_s)
    }

    fn halve(&mut self, now_s: f64) -> usize {
        self.limit = (self.limit / 2).max(1);
        self.grew_from = None;
        self.settling = 0;
        self.slow_start = false;
        self.last_rate = None;
        self.restart(now_s);
        self.limit
    }

    fn restart(&mut self, now_s: f64) {
        self.messages = 0;
        self.receives = 0;
        self.waited_s = 0.0;
        self.started_s = now_s;
        self.last_s = now_s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the controller against a simulated endpoint: `rate(limit)` messages/s, full receives of 10, the
    /// main thread waiting when `network_bound(limit)`. Returns the limits after each window (after a grow, the
    /// round that settles it and the window that judges it count as one).
    fn simulate(
        c: &mut ReceiveConcurrency,
        windows: usize,
        rate: impl Fn(usize) -> f64,
        network_bound: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut now = 0.0;
        (0..windows)
            .map(|_| {
                let per_receive = 10.0 / rate(c.limit());
                let waited = if network_bound(c.limit()) { per_receive / 2.0 } else { 0.0 };
                one_window(c, &mut now, per_receive, waited)
            })
            .collect()
    }

    /// Feeds full receives of 10, `per_receive` seconds apart (the main thread waiting `waited` of each), until a
    /// window ends (not the round that settles a grow) or the limit moves. Returns the limit.
    fn one_window(c: &mut ReceiveConcurrency, now: &mut f64, per_receive: f64, waited: f64) -> usize {
        let before = c.limit();
        loop {
            *now += per_receive;
            let settling = c.settling;
            c.received(10, waited, *now);
            if c.limit() != before || (c.receives == 0 && settling == 0) {
                return c.limit();
            }
        }
    }

    /// Feeds full receives at `rate(limit)` messages/s (the main thread waiting half of each) until the limit
    /// moves (at most 100,000 receives). Returns the limit.
    fn until_the_limit_moves(c: &mut ReceiveConcurrency, now: &mut f64, rate: impl Fn(usize) -> f64) -> usize {
        let before = c.limit();
        for _ in 0..100_000 {
            let per = 10.0 / rate(c.limit());
            *now += per;
            if c.received(10, per / 2.0, *now) != before {
                break;
            }
        }
        c.limit()
    }

    #[test]
    fn grows_while_throughput_grows_and_stops_at_the_knee() {
        // An endpoint whose rate rises linearly with concurrency up to 10 in flight, then stays flat.
        let mut c = ReceiveConcurrency::new(4, 32, 0.0);
        let limits = simulate(&mut c, 40, |l| 300.0 * l.min(10) as f64, |_| true);
        // A window that only measures, then slow start doubles (4, 8, 16); 16 does not pay and it goes back to 8,
        // then one at a time to the knee.
        assert_eq!(&limits[..4], &[4, 8, 16, 8], "{limits:?}");
        assert!(limits[4..].iter().all(|&l| l <= 11), "never beyond the knee again: {limits:?}");
        // After the knee it settles there (a probe above, a step back, a rest), never runs away or sinks.
        assert!(limits[12..].iter().all(|&l| (10..=11).contains(&l)), "{limits:?}");
    }

    #[test]
    fn never_exceeds_the_cap() {
        let mut c = ReceiveConcurrency::new(4, 6, 0.0);
        let limits = simulate(&mut c, 30, |l| 300.0 * l as f64, |_| true);
        assert_eq!(*limits.iter().max().unwrap(), 6);
        assert_eq!((c.limit(), c.peak()), (6, 6));
    }

    #[test]
    fn shrinks_when_the_database_is_the_bottleneck() {
        // Receives always answered before the main thread comes back: the database is slower than the network.
        let mut c = ReceiveConcurrency::new(8, 32, 0.0);
        let limits = simulate(&mut c, 20, |_| 2000.0, |_| false);
        assert_eq!(*limits.last().unwrap(), 1, "{limits:?}");
        assert!(limits.windows(2).all(|w| w[1] <= w[0]), "never grows: {limits:?}");
    }

    #[test]
    fn halves_on_throttling_and_on_empty_receives() {
        let mut c = ReceiveConcurrency::new(16, 32, 0.0);
        assert_eq!(c.throttled(1.0), 8);
        assert_eq!(c.throttled(1.1), 4);
        assert_eq!(c.received(0, 0.01, 1.2), 2, "an empty receive halves");
        assert_eq!(c.empty(1.3), 1);
        assert_eq!(c.empty(1.4), 1, "never below one");
    }

    #[test]
    fn a_grow_that_does_not_pay_is_undone() {
        // Flat rate whatever the concurrency: each grow is measured, does not pay, and is taken back.
        let mut c = ReceiveConcurrency::new(4, 32, 0.0);
        let limits = simulate(&mut c, 16, |_| 1000.0, |_| true);
        assert_eq!(&limits[..3], &[4, 8, 4], "the slow-start doubling is undone: {limits:?}");
        assert!(limits[3..].iter().all(|&l| (4..=5).contains(&l)), "then single probes, undone: {limits:?}");
        assert!(limits.iter().filter(|&&l| l == 4).count() > limits.len() / 2, "mostly at 4: {limits:?}");
    }

    #[test]
    fn a_resumed_controller_keeps_measuring_across_calls() {
        // Calls too short to finish a window: an unmeasured grow is never carried into the next call.
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        for call in 0..10 {
            let t = call as f64 * 10.0;
            c = c.resume(4, 16, t);
            for i in 1..=3 {
                c.received(10, 0.01, t + i as f64 * 0.01);
            }
        }
        assert_eq!(c.limit(), 4, "no window completed, so no grow");
        // A flat endpoint across calls of one window each: the doubling is measured and undone.
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        let mut limits = Vec::new();
        for call in 0..8 {
            let mut t = call as f64 * 10.0;
            c = c.resume(4, 16, t);
            let per = 10.0 / 1000.0;
            let before = c.limit();
            while c.limit() == before && t < call as f64 * 10.0 + 5.0 {
                t += per;
                c.received(10, per / 2.0, t);
            }
            limits.push(c.limit());
        }
        // (The first call measures a window, then doubles: each call runs until its limit moves.)
        assert_eq!(&limits[..2], &[8, 4], "{limits:?}");
        assert!(limits.iter().all(|&l| l <= 8) && c.limit() <= 5, "{limits:?}");
    }

    #[test]
    fn a_slow_first_window_does_not_make_a_grow_look_paid() {
        // Loopback: more receives in flight do not raise the rate, but the first window is slow (new connections,
        // the call's first statements). Judged against it, the doubling to 8 would have "paid" and stayed.
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        let mut now = 0.0;
        let mut limits = Vec::new();
        for window in 0..8 {
            let per_receive = 10.0 / if window == 0 { 400.0 } else { 1000.0 };
            limits.push(one_window(&mut c, &mut now, per_receive, per_receive / 2.0));
        }
        assert_eq!(&limits[..3], &[4, 8, 4], "measured, doubled, undone: {limits:?}");
        assert!(limits[3..].iter().all(|&l| l <= 5), "{limits:?}");
    }

    #[test]
    fn a_grow_is_judged_after_its_new_receives_have_answered_once() {
        // A real round trip: the rate rises with concurrency (250 msg/s per receive in flight, to a knee at 11),
        // but after each grow the added receives open new connections first, so the first round at the new
        // limit comes at 70 % of the old rate. Judged over that round, the doubling to 8 looks unpaid (about
        // 1,400 msg/s where 1,500 is asked) and is undone; judged after it, it pays.
        let rate = |l: usize| 250.0 * l.min(11) as f64;
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        let mut now = 0.0;
        // (limit, the limit before the last grow, receives of the opening round still to come)
        let (mut limit, mut from, mut opening) = (c.limit(), c.limit(), 0usize);
        let mut limits = Vec::new();
        for _ in 0..3000 {
            let per = if opening > 0 { 10.0 / (0.7 * rate(from)) } else { 10.0 / rate(limit) };
            opening = opening.saturating_sub(1);
            now += per;
            c.received(10, per / 2.0, now);
            if c.limit() != limit {
                if c.limit() > limit {
                    (from, opening) = (limit, c.limit());
                }
                limit = c.limit();
                limits.push(limit);
            }
        }
        assert_eq!(&limits[..2], &[8, 16], "doubled twice: {limits:?}");
        // 16 is past the knee and is undone; single probes then find the knee and stay near it.
        assert!((10..=12).contains(&c.limit()), "settled at the knee: {limits:?}");
    }

    #[test]
    fn back_to_back_batches_of_ten_receives_still_adapt() {
        // A worker: each call stores 100 messages (10 receives), commits, and the next call starts 5 ms later.
        // The endpoint's rate rises with concurrency (a real round trip). Windows span calls, so it grows.
        let rate = |l: usize| 400.0 * l.min(12) as f64;
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        let mut now = 0.0;
        for _ in 0..60 {
            c = c.resume(4, 16, now);
            let per = 10.0 / rate(c.limit());
            for _ in 0..10 {
                now += per;
                c.received(10, per / 2.0, now);
            }
            now += 0.002; // storing the batch
            c.pause(now);
            now += 0.005; // COMMIT, the next call's start
        }
        assert!(c.limit() >= 8, "grew across calls: {}", c.limit());
        // The same calls a minute apart: each window is cut by the gap, so it never completes and never grows.
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        let mut now = 0.0;
        for _ in 0..60 {
            c = c.resume(4, 16, now);
            for _ in 0..10 {
                now += 0.01;
                c.received(10, 0.005, now);
            }
            now += 60.0;
        }
        assert_eq!(c.limit(), 4);
    }

    #[test]
    fn the_time_between_calls_is_not_counted_in_a_carried_window() {
        // Calls of 10 receives at 1,000 msg/s, 0.9 s apart. Counting the gaps, a window at 8 would measure
        // ~100 msg/s and undo the doubling; not counting them, it measures the rate the endpoint gives.
        let rate = |l: usize| 250.0 * l.min(12) as f64;
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        let mut now = 0.0;
        let mut limits = Vec::new();
        for _ in 0..12 {
            c = c.resume(4, 16, now);
            let per = 10.0 / rate(c.limit());
            for _ in 0..10 {
                now += per;
                c.received(10, per / 2.0, now);
            }
            c.pause(now);
            limits.push(c.limit());
            now += 0.9;
        }
        assert!(c.limit() >= 8, "the doubling paid and stayed: {limits:?}");
    }

    #[test]
    fn a_window_restarts_and_only_measures_when_it_cannot_be_carried() {
        // The start was raised above the limit between the calls: the window in progress was measured at the old
        // limit, so it is dropped and the next one only measures.
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        for i in 1..=25 {
            c.received(10, 0.001, i as f64 * 0.01); // the first window, which only measures, ends at 0.25 s
        }
        for i in 26..=28 {
            c.received(10, 0.001, i as f64 * 0.01);
        }
        assert_eq!((c.limit(), c.receives, c.warming), (4, 3, false));
        let c = c.resume(6, 16, 0.29);
        assert_eq!((c.limit(), c.receives, c.warming), (6, 0, true), "clamped up: a fresh window");
        // A clock that went backwards (another clock's times): a fresh window too, never a negative gap.
        let mut c = ReceiveConcurrency::new(4, 16, 5.0);
        c.received(10, 0.001, 5.01);
        let c = c.resume(4, 16, 1.0);
        assert_eq!((c.receives, c.started_s), (0, 1.0));
        // Within the gap at the same limit: the window goes on, shifted by the gap.
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        c.received(10, 0.001, 0.1);
        c.pause(0.2);
        let c = c.resume(4, 16, 0.7);
        assert_eq!(c.receives, 1);
        assert!((c.started_s - 0.5).abs() < 1e-9, "{}", c.started_s);
    }

    #[test]
    fn a_grow_made_at_the_end_of_a_call_is_judged_against_the_rate_before_it() {
        // An endpoint whose rate rises with concurrency. The first call ends right after the grow to 8; the next
        // comes 5 s later (no carry: its first window only measures, cold). The grow must still be judged against
        // the rate at 4, and pay, not against the next call's cold window at 8.
        let rate = |l: usize| 250.0 * l as f64;
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        let mut now = 0.0;
        assert_eq!(until_the_limit_moves(&mut c, &mut now, rate), 8);
        c.pause(now);
        now += 5.0;
        c = c.resume(4, 16, now);
        let mut limits = Vec::new();
        for _ in 0..3 {
            let per = 10.0 / rate(c.limit());
            limits.push(one_window(&mut c, &mut now, per, per / 2.0));
        }
        assert_eq!(&limits[..2], &[8, 16], "measured, then the grow to 8 paid and it doubled again: {limits:?}");
    }

    #[test]
    fn a_fixed_number_is_never_carried_into_an_adaptive_call() {
        // A call with start = cap (fixed) counts no window; the next call, adaptive under the same cap, starts
        // within the carry gap. Carrying would measure its first window from the fixed call's start (a rate far
        // too low, against which the next grow would look paid): it must start a fresh window that only measures.
        let mut c = ReceiveConcurrency::new(8, 8, 0.0);
        for i in 1..=100 {
            c.received(10, 0.001, i as f64 * 0.1);
        }
        c.pause(10.0);
        let c = c.resume(4, 8, 10.5);
        assert_eq!((c.limit(), c.receives, c.warming), (8, 0, true));
        assert_eq!(c.started_s, 10.5);
    }

    #[test]
    fn an_undone_grow_never_goes_below_a_raised_start() {
        // Grown from 4 to 8, then the start is raised to 6 before the grow is judged. On a flat endpoint the grow
        // does not pay: it goes back to 6, the new start, not to 4.
        let mut c = ReceiveConcurrency::new(4, 16, 0.0);
        let mut now = 0.0;
        assert_eq!(until_the_limit_moves(&mut c, &mut now, |_| 1000.0), 8);
        c.pause(now);
        now += 0.1;
        c = c.resume(6, 16, now);
        assert_eq!(until_the_limit_moves(&mut c, &mut now, |_| 1000.0), 6);
    }

    #[test]
    fn equal_start_and_cap_is_a_fixed_number_except_under_throttling() {
        let mut c = ReceiveConcurrency::new(4, 4, 0.0);
        let limits = simulate(&mut c, 10, |_| 1000.0, |_| false);
        assert!(limits.iter().all(|&l| l == 4), "{limits:?}");
        assert_eq!(c.empty(1.0), 4);
        assert_eq!(c.throttled(1.1), 2, "throttling still halves");
    }

    #[test]
    fn start_and_cap_are_clamped() {
        assert_eq!(ReceiveConcurrency::new(0, 8, 0.0).limit(), 1);
        assert_eq!(ReceiveConcurrency::new(20, 8, 0.0).limit(), 8);
        assert_eq!(ReceiveConcurrency::new(4, 0, 0.0).limit(), 1);
    }
}
