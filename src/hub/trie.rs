//! The subscription table: a trie of pattern tokens, so that finding the
//! subscriptions a topic matches costs what the topic's tokens lead to, not
//! the number of patterns subscribed.
//!
//! Each node is reached by a sequence of pattern tokens and holds the
//! subscriptions whose pattern ends there (`here`) and those whose pattern
//! is that prefix followed by `>` (`rest`). A topic `t1.t2...tn` visits, at
//! each depth, the child for its literal token and the `*` child. Children
//! are kept in a table keyed by a hash of the token computed once (keyed
//! SipHash, so a peer cannot pick tokens that collide): a lookup allocates
//! nothing, and growing a table moves entries without hashing any token
//! again, so a node with tens of thousands of children grows in a fraction
//! of a millisecond.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::str::Split;

use hashbrown::HashTable;

/// A subscription's key: the connection and its own id for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SubKey {
    pub conn: u64,
    pub sid: u64,
}

/// Hashes a [`SubKey`] (daemon-chosen connection id, peer-chosen sid) by
/// multiplying: the sid is the peer's, but a peer only collides with itself
/// within one node, and a connection holds a bounded number of them.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Subs<V> = HashMap<SubKey, V, BuildHasherDefault<KeyHasher>>;

struct Child<V> {
    hash: u64,
    token: Box<str>,
    node: Node<V>,
}

struct Node<V> {
    children: HashTable<Child<V>>,
    star: Option<Box<Node<V>>>,
    here: Subs<V>,
    rest: Subs<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            children: HashTable::new(),
            star: None,
            here: Subs::default(),
            rest: Subs::default(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.star.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }
}

/// Patterns and their subscriptions.
pub(crate) struct Trie<V> {
    root: Node<V>,
    hasher: RandomState,
    subscriptions: usize,
    patterns: usize,
}

impl<V> Default for Trie<V> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            hasher: RandomState::new(),
            subscriptions: 0,
            patterns: 0,
        }
    }
}

impl<V> Trie<V> {
    /// Adds a subscription to a valid `pattern`; `false` (and nothing
    /// changed) if `key` is already subscribed to it.
    pub fn insert(&mut self, pattern: &str, key: SubKey, value: V) -> bool {
        let hasher = &self.hasher;
        let mut node = &mut self.root;
        let mut tokens = pattern.split('.').peekable();
        let set = loop {
            let Some(token) = tokens.next() else {
                break &mut node.here;
            };
            match token {
                ">" if tokens.peek().is_none() => break &mut node.rest,
                "*" => node = node.star.get_or_insert_with(Default::default),
                _ => {
                    let hash = hasher.hash_one(token);
                    let entry = node.children.entry(
                        hash,
                        |c| c.hash == hash && *c.token == *token,
                        |c| c.hash,
                    );
                    node = &mut entry
                        .or_insert_with(|| Child {
                            hash,
                            token: token.into(),
                            node: Node::default(),
                        })
                        .into_mut()
                        .node;
                }
            }
        };
        if set.contains_key(&key) {
            return false;
        }
        if set.is_empty() {
            self.patterns += 1;
        }
        set.insert(key, value);
        self.subscriptions += 1;
        true
    }

    /// Removes `key`'s subscription to `pattern`, pruning nodes left empty.
    pub fn remove(&mut self, pattern: &str, key: &SubKey) -> Option<V> {
        let (removed, last) = remove_at(&mut self.root, &self.hasher, pattern.split('.'), key);
        if removed.is_some() {
            self.subscriptions -= 1;
            if last {
                self.patterns -= 1;
            }
        }
        removed
    }

    /// Whether `topic` matches any subscription (cheaper than
    /// [`Self::for_each_match`]: it stops at the first).
    pub fn has_match(&self, topic: &str) -> bool {
        any_match(&self.root, &self.hasher, topic.split('.'))
    }

    /// Calls `f` for every subscription whose pattern matches the literal
    /// `topic`, once per subscription.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut f: impl FnMut(&SubKey, &'a V)) {
        visit(&self.root, &self.hasher, topic.split('.'), &mut f);
    }

    /// Subscriptions over all patterns.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }

    /// Distinct patterns with at least one subscription.
    pub fn patterns(&self) -> usize {
        self.patterns
    }

    /// Every pattern with its number of subscriptions, until `f` says stop.
    pub fn each_pattern(&self, mut f: impl FnMut(&str, usize) -> bool) {
        let mut prefix = String::new();
        walk(&self.root, &mut prefix, &mut f);
    }
}

/// Whether any subscription matches the rest of the topic (as [`visit`],
/// stopping at the first).
fn any_match<V>(node: &Node<V>, hasher: &RandomState, mut rest: Split<'_, char>) -> bool {
    let Some(token) = rest.next() else {
        return !node.here.is_empty();
    };
    if !node.rest.is_empty() {
        return true;
    }
    if !node.children.is_empty() {
        let hash = hasher.hash_one(token);
        if let Some(child) = node
            .children
            .find(hash, |c| c.hash == hash && *c.token == *token)
        {
            if any_match(&child.node, hasher, rest.clone()) {
                return true;
            }
        }
    }
    node.star
        .as_deref()
        .is_some_and(|star| any_match(star, hasher, rest))
}

fn visit<'a, V>(
    node: &'a Node<V>,
    hasher: &RandomState,
    mut rest: Split<'_, char>,
    f: &mut impl FnMut(&SubKey, &'a V),
) {
    let Some(token) = rest.next() else {
        for (k, v) in &node.here {
            f(k, v);
        }
        return;
    };
    // `>` here matches this token and every one after it.
    for (k, v) in &node.rest {
        f(k, v);
    }
    if !node.children.is_empty() {
        let hash = hasher.hash_one(token);
        if let Some(child) = node
            .children
            .find(hash, |c| c.hash == hash && *c.token == *token)
        {
            visit(&child.node, hasher, rest.clone(), f);
        }
    }
    if let Some(star) = &node.star {
        visit(star, hasher, rest, f);
    }
}

/// What was removed, and whether its set is now empty.
fn remove_at<V>(
    node: &mut Node<V>,
    hasher: &RandomState,
    mut tokens: Split<'_, char>,
    key: &SubKey,
) -> (Option<V>, bool) {
    let Some(token) = tokens.next() else {
        let removed = node.here.remove(key);
        return (removed, node.here.is_empty());
    };
    if token == ">" && tokens.clone().next().is_none() {
        let removed = node.rest.remove(key);
        return (removed, node.rest.is_empty());
    }
    if token == "*" {
        let Some(star) = node.star.as_deref_mut() else {
            return (None, false);
        };
        let result = remove_at(star, hasher, tokens, key);
        if star.is_empty() {
            node.star = None;
        }
        return result;
    }
    let hash = hasher.hash_one(token);
    let Ok(mut entry) = node
        .children
        .find_entry(hash, |c| c.hash == hash && *c.token == *token)
    else {
        return (None, false);
    };
    let result = remove_at(&mut entry.get_mut().node, hasher, tokens, key);
    if entry.get().node.is_empty() {
        entry.remove();
    }
    result
}

fn walk<V>(node: &Node<V>, prefix: &mut String, f: &mut impl FnMut(&str, usize) -> bool) -> bool {
    let len = prefix.len();
    let with = |prefix: &mut String, token: &str| {
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(token);
    };
    if !node.here.is_empty() && !prefix.is_empty() && !f(prefix, node.here.len()) {
        return false;
    }
    if !node.rest.is_empty() {
        with(prefix, ">");
        let go_on = f(prefix, node.rest.len());
        prefix.truncate(len);
        if !go_on {
            return false;
        }
    }
    if let Some(star) = &node.star {
        with(prefix, "*");
        let go_on = walk(star, prefix, f);
        prefix.truncate(len);
        if !go_on {
            return false;
        }
    }
    for child in &node.children {
        with(prefix, &child.token);
        let go_on = walk(&child.node, prefix, f);
        prefix.truncate(len);
        if !go_on {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(conn: u64, sid: u64) -> SubKey {
        SubKey { conn, sid }
    }

    fn matches(trie: &Trie<&'static str>, topic: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        trie.for_each_match(topic, |_, v| out.push(*v));
        out.sort();
        out
    }

    #[test]
    fn wildcards_match_one_token_or_the_rest() {
        let mut trie = Trie::default();
        for (i, pattern) in ["a.b", "a.*", "a.>", "*.b", ">", "a.b.c", "*.*.c"]
            .into_iter()
            .enumerate()
        {
            assert!(trie.insert(pattern, key(1, i as u64), pattern));
        }
        assert_eq!(matches(&trie, "a.b"), ["*.b", ">", "a.*", "a.>", "a.b"]);
        assert_eq!(matches(&trie, "a.b.c"), ["*.*.c", ">", "a.>", "a.b.c"]);
        assert_eq!(matches(&trie, "a"), [">"]);
        assert_eq!(matches(&trie, "x.y"), [">"]);
        assert_eq!(trie.subscriptions(), 7);
        assert_eq!(trie.patterns(), 7);
    }

    #[test]
    fn has_match_agrees_with_the_matches() {
        let patterns = ["a.b", "a.*", "a.>", "*.b", ">", "a.b.c", "*.*.c", "x"];
        let topics = [
            "a", "a.b", "a.c", "b.b", "a.b.c", "q.r.c", "q.r.d", "x", "x.y",
        ];
        // Every subset of the patterns: each way a match can be found.
        for set in 0..1u32 << patterns.len() {
            let mut trie = Trie::default();
            for (i, pattern) in patterns.iter().enumerate() {
                if set & 1 << i != 0 {
                    trie.insert(pattern, key(1, i as u64), *pattern);
                }
            }
            for topic in topics {
                let found = !matches(&trie, topic).is_empty();
                assert_eq!(trie.has_match(topic), found, "{topic} in set {set:b}");
            }
        }
    }

    #[test]
    fn removing_prunes_and_counts_patterns_once() {
        let mut trie = Trie::default();
        assert!(trie.insert("a.*.c", key(1, 1), "x"));
        assert!(trie.insert("a.*.c", key(2, 1), "y"));
        assert!(!trie.insert("a.*.c", key(2, 1), "y"), "the same key twice");
        assert_eq!((trie.patterns(), trie.subscriptions()), (1, 2));
        assert_eq!(trie.remove("a.*.c", &key(1, 1)), Some("x"));
        assert_eq!(trie.remove("a.*.c", &key(1, 1)), None);
        assert_eq!((trie.patterns(), trie.subscriptions()), (1, 1));
        assert_eq!(trie.remove("a.*.c", &key(2, 1)), Some("y"));
        assert_eq!((trie.patterns(), trie.subscriptions()), (0, 0));
        assert!(trie.root.is_empty(), "empty nodes are pruned");
    }

    #[test]
    fn every_pattern_is_listed_with_its_count() {
        let mut trie = Trie::default();
        for (i, p) in ["a.b", "a.b", "a.>", "*", "x.*.z"].into_iter().enumerate() {
            trie.insert(p, key(i as u64, 1), ());
        }
        let mut seen = Vec::new();
        trie.each_pattern(|p, n| {
            seen.push((p.to_owned(), n));
            true
        });
        seen.sort();
        let want: Vec<(String, usize)> = [("*", 1), ("a.>", 1), ("a.b", 2), ("x.*.z", 1)]
            .into_iter()
            .map(|(p, n)| (p.to_owned(), n))
            .collect();
        assert_eq!(seen, want);
    }
}
