//! Topics, patterns and names: what a hub subject may be (section 14 of
//! proto-spec.md).
//!
//! A subject is 1 to [`MAX_TOPIC_LEN`] bytes of UTF-8 made of tokens
//! separated by `.`; no token is empty. In a *pattern* (what a subscription
//! names) a token may be `*`, which matches exactly one token, and the last
//! token may be `>`, which matches one or more tokens. Anywhere else `*` and
//! `>` are not allowed, so a topic (what a publish names) and a served name
//! are always literal, and a pattern without wildcards matches exactly the
//! topic it spells.

use crate::limits::MAX_TOPIC_LEN;

/// Why a subject is refused (the text of the hub's error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// Empty or longer than [`MAX_TOPIC_LEN`] bytes.
    #[error("must be 1 to {MAX_TOPIC_LEN} bytes; got {0} bytes")]
    Length(usize),
    /// Starts or ends with `.`, or has `..`.
    #[error("has an empty token (a leading, trailing or doubled '.')")]
    EmptyToken,
    /// A wildcard where only literal tokens may be.
    #[error("has a wildcard ('*' or '>'), which only a subscription's pattern may have")]
    Wildcard,
    /// `*` or `>` inside a longer token, or `>` before the last token.
    #[error("has '*' or '>' that is not a whole token, or '>' that is not the last token")]
    MisplacedWildcard,
}

/// Whether `subject` is a literal topic (for a publish) or a served name.
pub fn check_topic(subject: &str) -> Result<(), SubjectError> {
    check(subject, false)
}

/// Whether `pattern` is a valid subscription pattern.
pub fn check_pattern(pattern: &str) -> Result<(), SubjectError> {
    check(pattern, true)
}

fn check(subject: &str, wildcards: bool) -> Result<(), SubjectError> {
    if subject.is_empty() || subject.len() > MAX_TOPIC_LEN {
        return Err(SubjectError::Length(subject.len()));
    }
    let mut tokens = subject.split('.').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() {
            return Err(SubjectError::EmptyToken);
        }
        let last = tokens.peek().is_none();
        match token {
            "*" | ">" if !wildcards => return Err(SubjectError::Wildcard),
            "*" => {}
            ">" if last => {}
            ">" => return Err(SubjectError::MisplacedWildcard),
            _ if token.contains(['*', '>']) => {
                return Err(if wildcards {
                    SubjectError::MisplacedWildcard
                } else {
                    SubjectError::Wildcard
                });
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_patterns_are_checked_token_by_token() {
        for ok in ["a", "a.b", "sensors.kitchen.temp", "ünï.✓", "a-b_c:d"] {
            assert_eq!(check_topic(ok), Ok(()), "{ok}");
            assert_eq!(check_pattern(ok), Ok(()), "{ok}");
        }
        for ok in ["*", ">", "a.*", "a.>", "*.b.>", "*.*"] {
            assert_eq!(check_pattern(ok), Ok(()), "{ok}");
            assert_eq!(check_topic(ok), Err(SubjectError::Wildcard), "{ok}");
        }
        for (bad, why) in [
            ("", SubjectError::Length(0)),
            (".a", SubjectError::EmptyToken),
            ("a.", SubjectError::EmptyToken),
            ("a..b", SubjectError::EmptyToken),
            (".", SubjectError::EmptyToken),
        ] {
            assert_eq!(check_topic(bad), Err(why), "{bad:?}");
            assert_eq!(check_pattern(bad), Err(why), "{bad:?}");
        }
        for bad in ["a*", "a.b>", ">.a", "a.>.b", "*>"] {
            assert_eq!(
                check_pattern(bad),
                Err(SubjectError::MisplacedWildcard),
                "{bad}"
            );
        }
        let long = "x".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(check_topic(&long), Err(SubjectError::Length(256)));
        assert_eq!(check_topic(&long[1..]), Ok(()));
    }
}
