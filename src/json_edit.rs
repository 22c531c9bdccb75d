//! Top-level JSON object editing that leaves every untouched value byte-for-byte as it came.
//!
//! Requests are rewritten by splicing: we parse only the outer object into `(key, raw value)`
//! pairs and write a new object from those slices. Numbers above 2^53, key order, escapes and
//! the prompt's exact bytes survive, and each untouched value is copied exactly once.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The outer object of a JSON document, as borrowed `(key, raw value)` pairs in document order.
#[derive(Debug)]
pub struct JsonObject<'a> {
    entries: Vec<(Cow<'a, str>, &'a RawValue)>,
    len: usize,
}

/// Why a document is not an editable object.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not valid JSON; the text says where.
    Invalid(String),
    /// Valid JSON, but not an object.
    NotObject,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Invalid(e) => write!(f, "invalid JSON: {e}"),
            ParseError::NotObject => f.write_str("the request body must be a JSON object"),
        }
    }
}

/// What to do with one top-level key.
#[derive(Debug, Clone, Copy)]
pub enum Edit<'v> {
    /// Drop every occurrence of the key.
    Remove,
    /// Put this raw JSON text at the key's first position (or at the end if absent).
    Set(&'v str),
}

impl<'a> JsonObject<'a> {
    /// Parses `bytes`, which must hold exactly one JSON object (surrounding whitespace allowed).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        // Python's json.loads, which vLLM uses, accepts a UTF-8 byte order mark.
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some() && first != Some(&b'{') {
            // Tell "not JSON" from "JSON but not an object", as vLLM's validator does.
            return match serde_json::from_slice::<&RawValue>(bytes) {
                Ok(_) => Err(ParseError::NotObject),
                Err(e) => Err(ParseError::Invalid(e.to_string())),
            };
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let entries = de
            .deserialize_map(EntriesVisitor)
            .and_then(|entries| de.end().map(|()| entries))
            .map_err(|e| ParseError::Invalid(e.to_string()))?;
        Ok(Self {
            entries,
            len: bytes.len(),
        })
    }

    /// The raw value of the last occurrence of `key` (vLLM's parser keeps the last duplicate).
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// Writes the object with `edits` applied. Keys not named in `edits` keep their place and
    /// their exact value bytes; `Set` keys take the place of their first occurrence.
    pub fn rewrite(&self, edits: &[(&str, Edit<'_>)]) -> Vec<u8> {
        let extra: usize = edits
            .iter()
            .map(|(k, e)| match e {
                Edit::Set(v) => k.len() + v.len() + 4,
                Edit::Remove => 0,
            })
            .sum();
        let mut out = Vec::with_capacity(self.len + extra);
        let mut written = vec![false; edits.len()];
        out.push(b'{');
        for (key, value) in &self.entries {
            let raw = match edits.iter().position(|(k, _)| k == key) {
                None => value.get(),
                Some(i) => match edits[i].1 {
                    Edit::Remove => continue,
                    Edit::Set(_) if written[i] => continue,
                    Edit::Set(v) => {
                        written[i] = true;
                        v
                    }
                },
            };
            push_member(&mut out, key, raw);
        }
        for (i, (key, edit)) in edits.iter().enumerate() {
            if let (Edit::Set(v), false) = (edit, written[i]) {
                push_member(&mut out, key, v);
            }
        }
        out.push(b'}');
        out
    }
}

fn push_member(out: &mut Vec<u8>, key: &str, raw: &str) {
    if out.len() > 1 {
        out.push(b',');
    }
    // Writing a &str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
    out.extend_from_slice(raw.as_bytes());
}

/// Collects map entries, borrowing keys when they contain no escapes.
struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(key) = map.next_key::<Key<'de>>()? {
            entries.push((key.0, map.next_value::<&'de RawValue>()?));
        }
        Ok(entries)
    }
}

struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(input: &str, edits: &[(&str, Edit<'_>)]) -> String {
        let obj = JsonObject::parse(input.as_bytes()).unwrap();
        String::from_utf8(obj.rewrite(edits)).unwrap()
    }

    #[test]
    fn untouched_values_keep_their_bytes_and_order() {
        let input = r#"{"seed": 18446744073709551615, "prompt":"caf\u00e9 \"q\" <&>","z":1.50e3,"a":[1, 2]}"#;
        let out = rewrite(input, &[("stream", Edit::Set("false"))]);
        assert_eq!(
            out,
            r#"{"seed":18446744073709551615,"prompt":"caf\u00e9 \"q\" <&>","z":1.50e3,"a":[1, 2],"stream":false}"#
        );
    }

    #[test]
    fn set_replaces_in_place_and_remove_drops_duplicates() {
        let input = r#"{"max_tokens":50,"stream":true,"stream_options":{"include_usage":true},"stream":true}"#;
        let out = rewrite(
            input,
            &[
                ("stream", Edit::Set("false")),
                ("stream_options", Edit::Remove),
                ("max_tokens", Edit::Set("1")),
            ],
        );
        assert_eq!(out, r#"{"max_tokens":1,"stream":false}"#);
    }

    #[test]
    fn escaped_keys_are_matched_by_their_value() {
        let out = rewrite(r#"{"str\u0065am":true}"#, &[("stream", Edit::Remove)]);
        assert_eq!(out, "{}");
    }

    #[test]
    fn a_byte_order_mark_is_accepted_and_dropped() {
        assert_eq!(rewrite("\u{feff}{\"a\":1}", &[]), r#"{"a":1}"#);
    }

    #[test]
    fn get_returns_the_last_duplicate() {
        let obj = JsonObject::parse(br#"{"a":1,"a":2}"#).unwrap();
        assert_eq!(obj.get("a").unwrap().get(), "2");
        assert!(obj.get("b").is_none());
    }

    #[test]
    fn parse_errors_distinguish_invalid_from_non_object() {
        assert_eq!(
            JsonObject::parse(b" [1] ").unwrap_err(),
            ParseError::NotObject
        );
        assert_eq!(
            JsonObject::parse(b"\"s\"").unwrap_err(),
            ParseError::NotObject
        );
        assert!(matches!(
            JsonObject::parse(b"{\"a\":").unwrap_err(),
            ParseError::Invalid(_)
        ));
        assert!(matches!(
            JsonObject::parse(b"{} {}").unwrap_err(),
            ParseError::Invalid(_)
        ));
        assert!(matches!(
            JsonObject::parse(b"").unwrap_err(),
            ParseError::Invalid(_)
        ));
        assert!(matches!(
            JsonObject::parse(b"nope").unwrap_err(),
            ParseError::Invalid(_)
        ));
    }
}
