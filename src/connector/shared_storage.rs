//! Shared storage (LMCache, vLLM's ExampleConnector): the prefiller writes the KV cache to
//! storage both servers see; the decoder finds it by prompt prefix.
//!
//! With `cache_hit_threshold` in the client's body the decoder is asked first (llm-d's
//! decode-first, `Flow::DecodeFirst`); the legs that follow a refusal carry a threshold of 0
//! so neither server refuses again.

use bytes::Bytes;

use super::{DecodePlan, Handoff, CACHE_HIT_THRESHOLD};
use crate::json_edit::{Edit, JsonObject, Spliced};

/// What the decoder answers, in `choices[0].finish_reason`, when too little of the prompt is
/// cached.
pub const BELOW_THRESHOLD: &str = "cache_threshold";

/// A threshold the client set is zeroed on the legs that follow a refusal, so that neither
/// server refuses the prompt again; absent, it stays absent.
pub(super) const ZERO_THRESHOLD: [(&str, Edit<'static>); 1] =
    [(CACHE_HIT_THRESHOLD, Edit::Replace("0"))];

/// The decoder gets the client's bytes: the prompt must match for the prefix lookup. Only a
/// threshold the client set is zeroed.
pub(super) fn decode_plan(request: &JsonObject<'_>, original: &Bytes) -> DecodePlan {
    let body = if request.get(CACHE_HIT_THRESHOLD).is_some() {
        request.rewrite(&ZERO_THRESHOLD)
    } else {
        Spliced::from(original.clone())
    };
    DecodePlan {
        body,
        handoff: Handoff::SharedStorage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::{completion_prefill, Connector, Flow};

    #[test]
    fn prefill_is_one_token_and_decode_is_untouched() {
        let original = Bytes::from_static(br#"{"prompt":"hi", "max_tokens":9,"stream":true}"#);
        let obj = JsonObject::parse(&original).unwrap();
        assert_eq!(
            completion_prefill(
                Connector::SharedStorage,
                r#"{"prompt":"hi", "max_tokens":9,"stream":true}"#,
                &Default::default()
            ),
            r#"{"prompt":"hi","max_tokens":1,"stream":false,"max_completion_tokens":1}"#
        );
        assert_eq!(decode_plan(&obj, &original).body.to_bytes(), original);
        assert_eq!(Connector::SharedStorage.flow(&obj), Flow::Sequential);
    }

    #[test]
    fn a_threshold_means_decode_first_and_zero_on_the_legs_after_it() {
        let original = Bytes::from_static(
            br#"{"prompt":"hi","cache_hit_threshold":0.8, "max_tokens":9,"stream":true}"#,
        );
        let obj = JsonObject::parse(&original).unwrap();
        assert_eq!(Connector::SharedStorage.flow(&obj), Flow::DecodeFirst);
        assert_eq!(Connector::NixlV2.flow(&obj), Flow::Sequential);
        assert_eq!(
            completion_prefill(
                Connector::SharedStorage,
                r#"{"prompt":"hi","cache_hit_threshold":0.8, "max_tokens":9,"stream":true}"#,
                &Default::default()
            ),
            r#"{"prompt":"hi","cache_hit_threshold":0,"max_tokens":1,"stream":false,"max_completion_tokens":1}"#
        );
        assert_eq!(
            decode_plan(&obj, &original).body.to_bytes(),
            Bytes::from_static(
                br#"{"prompt":"hi","cache_hit_threshold":0, "max_tokens":9,"stream":true}"#
            )
        );
        assert_eq!(
            Connector::SharedStorage
                .local_decode_body(&obj, &original)
                .to_bytes(),
            decode_plan(&obj, &original).body.to_bytes()
        );
    }
}
