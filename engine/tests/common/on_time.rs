//! Checking delayed messages: each body names its number and when it is
//! due (wall-clock ms), so the checker tells a delivery that came early or
//! twice from one that is on time.

#![allow(dead_code)]

use std::collections::HashSet;

/// Wall-clock milliseconds, the clock due times are kept in.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The body of message `i` published now with a delay of `delay_ms`.
pub fn body(i: u64, delay_ms: u64) -> String {
    format!("{i}:{}", wall_ms() + delay_ms)
}

/// The messages delivered so far.
#[derive(Default)]
pub struct OnTime {
    seen: HashSet<u64>,
}

impl OnTime {
    /// Account for one delivery: a panic if it came before its time or a
    /// second time.
    pub fn delivered(&mut self, data: &[u8]) {
        let body = std::str::from_utf8(data).unwrap();
        let (i, due) = body.split_once(':').unwrap();
        assert!(
            wall_ms() >= due.parse::<u64>().unwrap(),
            "{body} delivered before its time"
        );
        assert!(self.seen.insert(i.parse().unwrap()), "{body} twice");
    }

    /// How many distinct messages were delivered.
    pub fn count(&self) -> usize {
        self.seen.len()
    }
}
