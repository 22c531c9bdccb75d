//! LMCache: the prefiller writes the KV cache to shared storage; the decoder finds it by prefix.

use bytes::Bytes;

use super::{DecodePlan, Handoff};
use crate::json_edit::Spliced;

/// The decoder gets the client's bytes untouched: the prompt must match for the prefix lookup.
pub(super) fn decode_plan(original: &Bytes) -> DecodePlan {
    DecodePlan {
        body: Spliced::from(original.clone()),
        handoff: Handoff::SharedStorage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_is_one_token_and_decode_is_untouched() {
        let original = Bytes::from_static(br#"{"prompt":"hi", "max_tokens":9,"stream":true}"#);
        assert_eq!(
            crate::connector::completion_prefill(
                crate::Connector::LmCache,
                r#"{"prompt":"hi", "max_tokens":9,"stream":true}"#,
                &Default::default()
            ),
            r#"{"prompt":"hi","max_tokens":1,"stream":false,"max_completion_tokens":1}"#
        );
        assert_eq!(decode_plan(&original).body.to_bytes(), original);
    }
}
