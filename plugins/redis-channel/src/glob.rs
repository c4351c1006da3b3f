//! Redis's glob (`stringmatchlen`): the filter matches channels with it,
//! and the broker's RESP front end includes this file for `PUBSUB
//! CHANNELS pattern`, so the two cannot disagree.

/// Whether `s` matches the Redis glob `p`.
pub fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative with one backtrack point for the last `*`: linear in
    // practice and never recursive, whatever the pattern.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    while pi < p.len() && p[pi] == b'*' {
                        pi += 1;
                    }
                    if pi == p.len() {
                        return true;
                    }
                    star = Some((pi, si));
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(p, pi, s[si])
                        && matched
                    {
                        pi = next;
                        si += 1;
                        continue;
                    }
                }
                b'\\' if pi + 1 < p.len() => {
                    if p[pi + 1] == s[si] {
                        pi += 2;
                        si += 1;
                        continue;
                    }
                }
                c => {
                    if c == s[si] {
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
            }
        }
        match &mut star {
            Some((sp, ss)) => {
                *ss += 1;
                si = *ss;
                pi = *sp;
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The class `[...]` starting at `p[at]` against byte `c`: whether it
/// matches, and where the pattern goes on. An unclosed class runs to the
/// pattern's end, as in Redis.
fn class(p: &[u8], at: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = at + 1;
    let not = p.get(i) == Some(&b'^');
    if not {
        i += 1;
    }
    let mut hit = false;
    loop {
        match p.get(i) {
            None => break,
            Some(b']') => {
                i += 1;
                break;
            }
            Some(b'\\') if i + 1 < p.len() => {
                hit |= p[i + 1] == c;
                i += 2;
            }
            Some(&lo) if p.get(i + 1) == Some(&b'-') && i + 2 < p.len() && p[i + 2] != b']' => {
                let hi = p[i + 2];
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                hit |= (lo..=hi).contains(&c);
                i += 3;
            }
            Some(&x) => {
                hit |= x == c;
                i += 1;
            }
        }
    }
    Some((hit != not, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_as_redis_matches_them() {
        for (p, s, want) in [
            ("*", "", true),
            ("news.*", "news.", true),
            ("news.*", "news.a.b", true),
            ("news.*", "new", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "heeeello", true),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[b-a]llo", "hallo", true),
            ("h[a-b]llo", "hcllo", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("*a*b*c*", "xxaxxbxxcxx", true),
            ("*a*b*c", "xxaxxbxxcxx", false),
            ("a*", "b", false),
        ] {
            assert_eq!(glob(p.as_bytes(), s.as_bytes()), want, "{p} ~ {s}");
        }
    }

    #[test]
    fn a_long_hostile_pattern_is_still_quick() {
        let p = "*a".repeat(500) + "b";
        let s = "a".repeat(5000);
        assert!(!glob(p.as_bytes(), s.as_bytes()));
    }
}
