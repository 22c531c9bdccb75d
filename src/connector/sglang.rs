//! SGLang's P/D protocol: the same request to both servers, each told where the prefill
//! server's bootstrap listens and which room pairs the two; the decoder fetches the KV cache
//! from the room itself, so both legs go at once (`pd/concurrent.rs`).

use super::{unbracketed, Pairing};
use crate::json_edit::{Edit, JsonObject, Spliced};

/// The body both legs carry: the client's request, token limits and `stream` as sent, plus
/// the bootstrap fields (any the client sent are replaced: they aim the decoder's fetch).
pub(super) fn body(request: &JsonObject<'_>, pairing: &Pairing, prefiller_host: &str) -> Spliced {
    // JSON strings of a host: a registered name or an IP literal never needs escaping.
    let host = format!("\"{}\"", unbracketed(prefiller_host));
    let port = pairing.bootstrap_port.to_string();
    let room = pairing.room.to_string();
    request.rewrite(&[
        ("bootstrap_host", Edit::Set(&host)),
        ("bootstrap_port", Edit::Set(&port)),
        ("bootstrap_room", Edit::Set(&room)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn both_legs_get_the_bootstrap_fields_and_nothing_else_changes() {
        let source = Bytes::from_static(
            br#"{"prompt":"hi","max_tokens":9,"stream":true,"bootstrap_room":1}"#,
        );
        let obj = JsonObject::parse(&source).unwrap();
        let pairing = Pairing {
            bootstrap_port: 8998,
            room: 42,
            ..Pairing::default()
        };
        assert_eq!(
            body(&obj, &pairing, "[fd00::1]").to_bytes(),
            Bytes::from_static(
                br#"{"prompt":"hi","max_tokens":9,"stream":true,"bootstrap_room":42,"bootstrap_host":"fd00::1","bootstrap_port":8998}"#
            )
        );
    }
}
