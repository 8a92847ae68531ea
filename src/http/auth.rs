//! Who calls over HTTP: with `[http.tokens]`, the user whose bearer token the
//! request carries (compared in constant time, never logged); without, the
//! configured `http.user`. Pure. Not for: whether that user may call a function
//! (the dispatcher checks that, as for every request).

use std::collections::BTreeMap;

/// Why a request has no user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No `Authorization: Bearer …` header.
    Missing,
    /// A token that is not configured.
    Invalid,
}

/// The user an `/api` request runs as, from its `Authorization` header.
pub(crate) fn user(
    tokens: &BTreeMap<String, String>,
    default_user: &str,
    authorization: Option<&str>,
) -> Result<String, Denied> {
    if tokens.is_empty() {
        return Ok(default_user.to_string());
    }
    let presented = authorization
        .and_then(|h| {
            let (scheme, token) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(Denied::Missing)?;
    // Every configured token is compared, whichever matches, so the time taken
    // says nothing about which (or how much of one) matched.
    let mut found = None;
    for (token, user) in tokens {
        if same(token.as_bytes(), presented.as_bytes()) {
            found = Some(user);
        }
    }
    found.cloned().ok_or(Denied::Invalid)
}

/// Compares in time that depends on the lengths only, not on where the bytes
/// differ (tokens here, the dashboard's CSRF token in `dashboard.rs`).
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> BTreeMap<String, String> {
        [
            ("s3cret-token-for-tom".to_string(), "tom".to_string()),
            ("another-token-for-foo".to_string(), "foo".to_string()),
        ]
        .into()
    }

    #[test]
    fn without_tokens_everyone_is_the_http_user() {
        assert_eq!(user(&BTreeMap::new(), "web", None), Ok("web".into()));
        assert_eq!(
            user(&BTreeMap::new(), "web", Some("Bearer whatever")),
            Ok("web".into())
        );
    }

    #[test]
    fn a_configured_token_names_its_user() {
        let t = tokens();
        assert_eq!(
            user(&t, "web", Some("Bearer s3cret-token-for-tom")),
            Ok("tom".into())
        );
        assert_eq!(
            user(&t, "web", Some("bearer  another-token-for-foo ")),
            Ok("foo".into())
        );
    }

    #[test]
    fn missing_or_wrong_tokens_are_denied() {
        let t = tokens();
        assert_eq!(user(&t, "web", None), Err(Denied::Missing));
        assert_eq!(
            user(&t, "web", Some("Basic dG9tOnB3")),
            Err(Denied::Missing)
        );
        assert_eq!(user(&t, "web", Some("Bearer ")), Err(Denied::Missing));
        assert_eq!(
            user(&t, "web", Some("Bearer s3cret-token-for-to")),
            Err(Denied::Invalid)
        );
        assert_eq!(
            user(&t, "web", Some("Bearer s3cret-token-for-tomm")),
            Err(Denied::Invalid)
        );
    }

    #[test]
    fn same_compares_whole_values() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(!same(b"", b"a"));
        assert!(same(b"", b""));
    }
}
