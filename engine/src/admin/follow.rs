//! Followers of a plugin's log (`GET /api/plugins/{name}/logs?follow=true`):
//! bounded in number, and let go when they stop reading.
//!
//! A follower is a connection held open for as long as its client likes,
//! so 2000 of them that never read took 670 MiB and 2024 descriptors. Here
//! there are at most [`MAX_FOLLOWERS`] at once, [`MAX_FOLLOWERS_PER_USER`]
//! per user (one past it gets 429). Every follower of a plugin reads the
//! same broadcast ring (the plugin's last 1024 lines, shared), so what a
//! slow one holds is its place in that ring and hyper's bounded buffer
//! ([`super::http::BUFFER_BYTES`]); one that falls a whole ring behind has
//! stopped reading, and is told how many lines it missed and dropped.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// Log followers at once, every user together.
pub const MAX_FOLLOWERS: usize = 64;
/// Log followers at once of one user.
pub const MAX_FOLLOWERS_PER_USER: usize = 4;

/// The followers there are, by user.
#[derive(Debug, Default)]
pub(crate) struct Followers {
    by_user: Mutex<HashMap<String, usize>>,
}

/// One follower's place; given back when its stream is dropped (the
/// client left, or it was let go).
#[derive(Debug)]
pub(crate) struct Following {
    all: Arc<Followers>,
    user: String,
}

impl Followers {
    /// A place for a follower of `user`, or why there is none.
    pub(crate) fn enter(self: &Arc<Self>, user: &str) -> Result<Following, String> {
        let mut m = self.by_user.lock();
        if m.values().sum::<usize>() >= MAX_FOLLOWERS {
            return Err(format!(
                "{MAX_FOLLOWERS} log followers already; try again when one has left"
            ));
        }
        let n = m.entry(user.to_owned()).or_default();
        if *n >= MAX_FOLLOWERS_PER_USER {
            return Err(format!(
                "user '{user}' already follows {MAX_FOLLOWERS_PER_USER} logs"
            ));
        }
        *n += 1;
        Ok(Following {
            all: self.clone(),
            user: user.to_owned(),
        })
    }

    /// Followers now.
    pub(crate) fn count(&self) -> usize {
        self.by_user.lock().values().sum()
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut m = self.all.by_user.lock();
        if let Some(n) = m.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_are_bounded_per_user_and_in_total() {
        let f = Arc::new(Followers::default());
        let mine: Vec<_> = (0..MAX_FOLLOWERS_PER_USER)
            .map(|_| f.enter("ann").unwrap())
            .collect();
        assert!(f.enter("ann").unwrap_err().contains("already follows"));
        let mut others = Vec::new();
        for i in 0..(MAX_FOLLOWERS - MAX_FOLLOWERS_PER_USER) {
            others.push(f.enter(&format!("user{i}")).unwrap());
        }
        assert!(
            f.enter("bob")
                .unwrap_err()
                .contains("log followers already")
        );
        drop(mine);
        assert_eq!(f.count(), MAX_FOLLOWERS - MAX_FOLLOWERS_PER_USER);
        assert!(f.enter("bob").is_ok());
    }
}
