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

use std::sync::Arc;

/// Log followers at once, every user together.
pub const MAX_FOLLOWERS: usize = 64;
/// Log followers at once of one user.
pub const MAX_FOLLOWERS_PER_USER: usize = 4;

/// The followers there are, by user.
pub(crate) type Followers = crate::untrusted::Places<String>;

/// The bounds of the followers.
pub(crate) fn followers() -> Arc<Followers> {
    Followers::new(MAX_FOLLOWERS, MAX_FOLLOWERS_PER_USER)
}

/// A follower's place for `user`, or why there is none (for a 429).
pub(crate) fn follow(
    all: &Arc<Followers>,
    user: &str,
) -> Result<crate::untrusted::Place<String>, String> {
    all.take(user.to_owned()).map_err(|full| match full {
        crate::untrusted::Full::Total(n) => {
            format!("{n} log followers already; try again when one has left")
        }
        crate::untrusted::Full::Key(n) => format!("user '{user}' already follows {n} logs"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_past_a_bound_is_told_which() {
        let f = followers();
        let mine: Vec<_> = (0..MAX_FOLLOWERS_PER_USER)
            .map(|_| follow(&f, "ann").unwrap())
            .collect();
        assert!(follow(&f, "ann").unwrap_err().contains("already follows"));
        let others: Vec<_> = (0..(MAX_FOLLOWERS - MAX_FOLLOWERS_PER_USER))
            .map(|i| follow(&f, &format!("user{i}")).unwrap())
            .collect();
        assert!(
            follow(&f, "bob")
                .unwrap_err()
                .contains("log followers already")
        );
        drop((mine, others));
        assert_eq!(f.held(), 0);
    }
}
