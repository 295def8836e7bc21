//! The `subjects` fuzz target: the hub's subject rules and its subscription
//! trie against an independent model.
//!
//! The input is a sequence of operations on subjects built from a small
//! alphabet of tokens (`a`, `b`, `ab`, `*`, `>` and the empty token), so that
//! wildcards, invalid subjects and overlapping patterns are common:
//! subscribe a key to a pattern, unsubscribe it, or publish on a topic.
//! After each publish the subscriptions the trie finds must be exactly those
//! whose pattern the model says matches, each once; after every operation the
//! counts must agree. Validity is checked against the rules written again
//! here.

use std::collections::BTreeSet;

use crate::hub::subject::{check_pattern, check_topic};
use crate::hub::trie::{SubKey, Trie};

/// The token alphabet.
const TOKENS: [&str; 6] = ["a", "b", "ab", "*", ">", ""];

/// A subject of 1 to 4 tokens, from the next bytes.
fn subject(bytes: &mut impl Iterator<Item = u8>) -> String {
    let n = 1 + bytes.next().unwrap_or(0) as usize % 4;
    (0..n)
        .map(|_| TOKENS[bytes.next().unwrap_or(0) as usize % TOKENS.len()])
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether `pattern` matches `topic`: token by token, `*` one token, a final
/// `>` one or more.
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    for (i, token) in p.iter().enumerate() {
        if *token == ">" {
            return i == p.len() - 1 && t.len() > i;
        }
        match t.get(i) {
            Some(tok) if *token == "*" || token == tok => {}
            _ => return false,
        }
    }
    t.len() == p.len()
}

/// The subject rules, written again: non-empty tokens; in a pattern `*`
/// anywhere and `>` last, as whole tokens; in a topic neither.
fn valid(subject: &str, pattern: bool) -> bool {
    let tokens: Vec<&str> = subject.split('.').collect();
    !subject.is_empty()
        && subject.len() <= crate::limits::MAX_TOPIC_LEN
        && tokens.iter().enumerate().all(|(i, t)| match *t {
            "" => false,
            "*" => pattern,
            ">" => pattern && i == tokens.len() - 1,
            t => !t.contains(['*', '>']),
        })
}

/// The fuzz target.
pub fn subjects(data: &[u8]) {
    let mut trie: Trie<String> = Trie::default();
    let mut model: BTreeSet<(String, u64, u64)> = BTreeSet::new();
    let mut bytes = data.iter().copied();
    while let Some(op) = bytes.next() {
        let conn = u64::from(op >> 4 & 3);
        let sid = u64::from(op >> 6);
        let text = subject(&mut bytes);
        assert_eq!(
            check_pattern(&text).is_ok(),
            valid(&text, true),
            "pattern {text:?}"
        );
        assert_eq!(
            check_topic(&text).is_ok(),
            valid(&text, false),
            "topic {text:?}"
        );
        let key = SubKey { conn, sid };
        match op % 3 {
            0 if check_pattern(&text).is_ok() => {
                let new = model.insert((text.clone(), conn, sid));
                assert_eq!(
                    trie.insert(&text, key, text.clone()),
                    new,
                    "insert {text:?}"
                );
            }
            1 if check_pattern(&text).is_ok() => {
                let had = model.remove(&(text.clone(), conn, sid));
                assert_eq!(trie.remove(&text, &key).is_some(), had, "remove {text:?}");
            }
            2 if check_topic(&text).is_ok() => {
                let mut found = Vec::new();
                trie.for_each_match(&text, |k, p| found.push((p.clone(), k.conn, k.sid)));
                let count = found.len();
                let found: BTreeSet<_> = found.into_iter().collect();
                assert_eq!(
                    count,
                    found.len(),
                    "a subscription matched twice for {text:?}"
                );
                let want: BTreeSet<_> = model
                    .iter()
                    .filter(|(p, _, _)| pattern_matches(p, &text))
                    .cloned()
                    .collect();
                assert_eq!(found, want, "subscriptions matching {text:?}");
            }
            _ => {}
        }
        assert_eq!(trie.subscriptions(), model.len());
        let patterns: BTreeSet<&String> = model.iter().map(|(p, _, _)| p).collect();
        assert_eq!(trie.patterns(), patterns.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_matches_as_the_rules_say() {
        assert!(pattern_matches("a.*", "a.b"));
        assert!(!pattern_matches("a.*", "a"));
        assert!(pattern_matches("a.>", "a.b.ab"));
        assert!(!pattern_matches("a.>", "a"));
        assert!(pattern_matches(">", "b"));
        assert!(!pattern_matches("a.b", "a.b.a"));
    }

    #[test]
    fn scripted_inputs_hold() {
        // Subscribe (op 0, key 0/0) "a.*", publish (op 2) "a.b", remove
        // (op 1) it, publish again.
        subjects(&[0, 1, 0, 3, 2, 1, 0, 1, 1, 1, 0, 3, 2, 1, 0, 1]);
        for seed in 0..200u32 {
            let data: Vec<u8> = (0..64u32)
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503) >> 13) as u8)
                .collect();
            subjects(&data);
        }
    }
}
