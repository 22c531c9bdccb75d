//! Top-level JSON object editing that leaves every untouched value byte-for-byte as it came.
//!
//! Requests are rewritten by splicing: we parse only the outer object into `(key, raw value)`
//! pairs and build the new object from those pieces. Numbers above 2^53, key order, escapes and
//! the prompt's exact bytes survive. Large untouched runs of members are not copied at all: the
//! result ([`Spliced`]) refers to them in the client's buffer, and is sent as a list of slices,
//! so a 400 KB prompt is copied once (when the client's body is collected) however many legs
//! carry it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The outer object of a JSON document, as borrowed `(key, raw value)` pairs in document order.
#[derive(Debug)]
pub struct JsonObject<'a> {
    source: &'a Bytes,
    entries: Vec<Entry<'a>>,
}

#[derive(Debug)]
struct Entry<'a> {
    key: Cow<'a, str>,
    value: &'a RawValue,
    /// Where the member's text starts in `source`: just after the `{` or `,` before it.
    start: usize,
    /// Where its value ends in `source`.
    end: usize,
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
    /// Like `Set` where the key is present; absent, it stays absent.
    Replace(&'v str),
}

impl<'a> JsonObject<'a> {
    /// Parses `source`, which must hold exactly one JSON object (surrounding whitespace allowed).
    pub fn parse(source: &'a Bytes) -> Result<Self, ParseError> {
        // Python's json.loads, which vLLM uses, accepts a UTF-8 byte order mark.
        let bytes: &'a [u8] = source.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(source);
        let open = bytes.iter().position(|b| !b.is_ascii_whitespace());
        if open.is_some_and(|i| bytes[i] != b'{') {
            // Tell "not JSON" from "JSON but not an object", as vLLM's validator does.
            return match serde_json::from_slice::<&RawValue>(bytes) {
                Ok(_) => Err(ParseError::NotObject),
                Err(e) => Err(ParseError::Invalid(e.to_string())),
            };
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let members = de
            .deserialize_map(EntriesVisitor)
            .and_then(|members| de.end().map(|()| members))
            .map_err(|e| ParseError::Invalid(e.to_string()))?;
        // Locate each member in `source`: values borrow from it, and between one value's end
        // and the next key there is only whitespace and one comma.
        let base = source.as_ptr() as usize;
        let mut after = base_offset(bytes, base) + open.unwrap_or(0) + 1;
        let mut entries = Vec::with_capacity(members.len());
        for (i, (key, value)) in members.into_iter().enumerate() {
            let mut start = after;
            if i > 0 {
                start += source[after..]
                    .iter()
                    .position(|&b| b == b',')
                    .map_or(0, |p| p + 1);
            }
            let end = base_offset(value.get().as_bytes(), base) + value.get().len();
            after = end;
            entries.push(Entry {
                key,
                value,
                start,
                end,
            });
        }
        Ok(Self { source, entries })
    }

    /// The raw value of the last occurrence of `key` (vLLM's parser keeps the last duplicate).
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| e.value)
    }

    /// Every key (escapes decoded) in document order, duplicates included.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.key.as_ref())
    }

    /// The object with `edits` applied. Keys not named in `edits` keep their place and their
    /// exact bytes; `Set` keys take the place of their first occurrence.
    pub fn rewrite(&self, edits: &[(&str, Edit<'_>)]) -> Spliced {
        self.rewrite_borrowing(edits, BORROW_MIN)
    }

    /// [`rewrite`](Self::rewrite), borrowing runs of untouched members of `borrow_min` bytes
    /// or more from the source (copying the rest). The bytes are the same for any threshold;
    /// the fuzz target checks that with 0 (borrow everything) against `usize::MAX`.
    #[doc(hidden)]
    pub fn rewrite_borrowing(&self, edits: &[(&str, Edit<'_>)], borrow_min: usize) -> Spliced {
        let mut out = SplicedBuilder::new(self.source, borrow_min);
        let mut written = vec![false; edits.len()];
        let mut done = |i: usize| std::mem::replace(&mut written[i], true);
        for entry in &self.entries {
            match edits.iter().position(|(k, _)| *k == entry.key) {
                None => out.member_from_source(entry.start, entry.end),
                Some(i) => match edits[i].1 {
                    Edit::Remove => {}
                    Edit::Set(v) | Edit::Replace(v) => {
                        if !done(i) {
                            out.member(&entry.key, v);
                        }
                    }
                },
            }
        }
        for (i, (key, edit)) in edits.iter().enumerate() {
            if let Edit::Set(v) = edit {
                if !done(i) {
                    out.member(key, v);
                }
            }
        }
        out.finish()
    }
}

/// Offset of `slice` (which lies inside the buffer starting at `base`) in that buffer.
fn base_offset(slice: &[u8], base: usize) -> usize {
    slice.as_ptr() as usize - base
}

/// Runs of source members shorter than this are copied: a few more bytes in one write are
/// cheaper than one more slice for the kernel to gather.
const BORROW_MIN: usize = 4 * 1024;

/// Builds a [`Spliced`] body: small pieces are gathered into one owned buffer, large runs of
/// untouched members are kept as slices of the source.
struct SplicedBuilder<'s> {
    source: &'s Bytes,
    borrow_min: usize,
    parts: VecDeque<Bytes>,
    /// Owned bytes not yet pushed to `parts`.
    pending: Vec<u8>,
    /// A run of consecutive untouched members not yet emitted, as a source range.
    run: Option<(usize, usize)>,
    members: usize,
}

impl<'s> SplicedBuilder<'s> {
    fn new(source: &'s Bytes, borrow_min: usize) -> Self {
        // Room for a small body whole, or for the edits between the borrowed runs of a large one.
        let mut pending = Vec::with_capacity(source.len().min(borrow_min) + 256);
        pending.push(b'{');
        Self {
            source,
            borrow_min,
            parts: VecDeque::new(),
            pending,
            run: None,
            members: 0,
        }
    }

    fn member_from_source(&mut self, start: usize, end: usize) {
        match &mut self.run {
            // The source bytes between the two members are `,` and whitespace: keep them.
            Some((_, run_end)) if source_gap_is_separator(self.source, *run_end, start) => {
                *run_end = end
            }
            _ => {
                self.flush_run();
                self.separator();
                self.run = Some((start, end));
            }
        }
        self.members += 1;
    }

    fn member(&mut self, key: &str, raw: &str) {
        self.flush_run();
        self.separator();
        self.members += 1;
        // Writing a &str to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.pending, key);
        self.pending.push(b':');
        self.pending.extend_from_slice(raw.as_bytes());
    }

    fn separator(&mut self) {
        if self.members > 0 {
            self.pending.push(b',');
        }
    }

    fn flush_run(&mut self) {
        let Some((start, end)) = self.run.take() else {
            return;
        };
        if end - start < self.borrow_min {
            self.pending.extend_from_slice(&self.source[start..end]);
            return;
        }
        self.flush_pending();
        self.parts.push_back(self.source.slice(start..end));
    }

    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            self.parts
                .push_back(Bytes::from(std::mem::take(&mut self.pending)));
        }
    }

    fn finish(mut self) -> Spliced {
        self.flush_run();
        self.pending.push(b'}');
        self.flush_pending();
        let len = self.parts.iter().map(Bytes::len).sum();
        Spliced {
            parts: self.parts,
            len,
        }
    }
}

/// Whether the source bytes in `from..to` are only what separates two members.
fn source_gap_is_separator(source: &[u8], from: usize, to: usize) -> bool {
    from == to
        || source[from..to]
            .iter()
            .all(|b| *b == b',' || b.is_ascii_whitespace())
}

/// A rewritten body: owned pieces and slices of the client's buffer, sent in order, each as
/// one frame (hyper gathers them into one `writev`).
#[derive(Debug, Clone, Default)]
pub struct Spliced {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Spliced {
    /// The body's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body as one buffer (copies unless it is a single piece).
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts[0].clone(),
            _ => Bytes::from(self.to_vec()),
        }
    }

    /// Takes the next piece off the front (how the body is sent, piece by piece).
    pub fn pop_front(&mut self) -> Option<Bytes> {
        let part = self.parts.pop_front()?;
        self.len -= part.len();
        Some(part)
    }

    /// The body as one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for part in &self.parts {
            out.extend_from_slice(part);
        }
        out
    }
}

impl From<Bytes> for Spliced {
    fn from(bytes: Bytes) -> Self {
        let len = bytes.len();
        let parts = if len == 0 {
            VecDeque::new()
        } else {
            VecDeque::from([bytes])
        };
        Self { parts, len }
    }
}

/// Lossy UTF-8, for trace logs. Pieces are cut at member boundaries, so a piece never splits
/// a character of valid input.
impl fmt::Display for Spliced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            f.write_str(&String::from_utf8_lossy(part))?;
        }
        Ok(())
    }
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
        let source = Bytes::copy_from_slice(input.as_bytes());
        let obj = JsonObject::parse(&source).unwrap();
        String::from_utf8(obj.rewrite(edits).to_vec()).unwrap()
    }

    #[test]
    fn untouched_values_keep_their_bytes_and_order() {
        let input = r#"{"seed": 18446744073709551615, "prompt":"caf\u00e9 \"q\" <&>","z":1.50e3,"a":[1, 2]}"#;
        let out = rewrite(input, &[("stream", Edit::Set("false"))]);
        assert_eq!(
            out,
            r#"{"seed": 18446744073709551615, "prompt":"caf\u00e9 \"q\" <&>","z":1.50e3,"a":[1, 2],"stream":false}"#
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
        let source = Bytes::from_static(br#"{"a":1,"a":2}"#);
        let obj = JsonObject::parse(&source).unwrap();
        assert_eq!(obj.get("a").unwrap().get(), "2");
        assert!(obj.get("b").is_none());
    }

    #[test]
    fn parse_errors_distinguish_invalid_from_non_object() {
        assert_eq!(
            JsonObject::parse(&Bytes::from_static(b" [1] ")).unwrap_err(),
            ParseError::NotObject
        );
        assert_eq!(
            JsonObject::parse(&Bytes::from_static(b"\"s\"")).unwrap_err(),
            ParseError::NotObject
        );
        assert!(matches!(
            JsonObject::parse(&Bytes::from_static(b"{\"a\":")).unwrap_err(),
            ParseError::Invalid(_)
        ));
        assert!(matches!(
            JsonObject::parse(&Bytes::from_static(b"{} {}")).unwrap_err(),
            ParseError::Invalid(_)
        ));
        assert!(matches!(
            JsonObject::parse(&Bytes::from_static(b"")).unwrap_err(),
            ParseError::Invalid(_)
        ));
        assert!(matches!(
            JsonObject::parse(&Bytes::from_static(b"nope")).unwrap_err(),
            ParseError::Invalid(_)
        ));
    }

    /// A body with a prompt past `BORROW_MIN`: the prompt is sent from the client's buffer,
    /// and the result is the same object as the copying path would give.
    #[test]
    fn large_members_are_borrowed_not_copied() {
        let prompt = "x".repeat(BORROW_MIN * 2);
        let input = format!(
            "{{ \"model\": \"m\",\n \"prompt\": \"{prompt}\" , \"stream\":true, \"n\": 2,\"seed\":1}}"
        );
        let source = Bytes::from(input.clone());
        let obj = JsonObject::parse(&source).unwrap();
        let out = obj.rewrite(&[("stream", Edit::Set("false")), ("n", Edit::Remove)]);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(
            text,
            format!(
                "{{ \"model\": \"m\",\n \"prompt\": \"{prompt}\",\"stream\":false,\"seed\":1}}"
            )
        );
        assert_eq!(out.len(), text.len());
        // The run holding the prompt points into the source: no copy was made.
        let range = source.as_ptr() as usize..source.as_ptr() as usize + source.len();
        let borrowed: usize = out
            .parts
            .iter()
            .filter(|p| range.contains(&(p.as_ptr() as usize)))
            .map(Bytes::len)
            .sum();
        assert!(borrowed > prompt.len(), "{borrowed} bytes borrowed");
        assert!(out.parts.len() <= 3, "{} pieces", out.parts.len());
    }

    #[test]
    fn a_large_member_after_removed_ones_keeps_valid_separators() {
        let big = "y".repeat(BORROW_MIN + 1);
        let input = format!(r#"{{"n":1,"best_of":2,"prompt":"{big}","echo":true,"a":[1]}}"#);
        let source = Bytes::from(input);
        let obj = JsonObject::parse(&source).unwrap();
        let edits = [
            ("n", Edit::Remove),
            ("best_of", Edit::Remove),
            ("echo", Edit::Remove),
            ("max_tokens", Edit::Set("1")),
        ];
        let out = obj.rewrite(&edits).to_vec();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"prompt": big, "a": [1], "max_tokens": 1})
        );
    }

    #[tokio::test]
    async fn a_spliced_body_sends_every_piece_with_an_exact_length() {
        use http_body_util::BodyExt;
        let big = "z".repeat(BORROW_MIN * 3);
        let source = Bytes::from(format!(r#"{{"prompt":"{big}","stream":true}}"#));
        let obj = JsonObject::parse(&source).unwrap();
        let out = obj.rewrite(&[("stream", Edit::Set("false"))]);
        let expected = out.to_vec();
        assert_eq!(out.len(), expected.len());
        let collected = out.collect().await.unwrap().to_bytes();
        assert_eq!(collected, Bytes::from(expected));
    }
}
