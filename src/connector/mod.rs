//! The P/D connectors: how each one rewrites the prefill leg and builds the decode leg.
//!
//! Connectors are pure functions over request bytes; the network flow lives in `pd/` and is
//! written once for all of them. What a one-token prefill changes per route is `api.rs`'s.

mod lmcache;
mod nixl;
mod nixlv2;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::api::Api;
use crate::json_edit::{Edit, JsonObject, Spliced};

/// The connector selected by `-connector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connector {
    /// vLLM's NixlConnector: handoff through `kv_transfer_params` (the default).
    NixlV2,
    /// The legacy llm-d fork protocol: top-level `do_remote_*` and `remote_*` fields.
    Nixl,
    /// LMCache shared storage: prefill with one token, then the untouched request.
    LmCache,
}

/// What the decoder was told about the prefilled KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// The decoder got the prefiller's remote KV parameters and will pull the blocks.
    Remote,
    /// The KV cache moves through shared storage the decoder looks up by prefix.
    SharedStorage,
    /// The prefiller returned no usable parameters: the decoder prefills locally.
    LocalPrefill(&'static str),
}

/// The decode leg's body and what it carries.
#[derive(Debug)]
pub struct DecodePlan {
    pub body: Spliced,
    pub handoff: Handoff,
}

/// Why the prefiller's successful reply cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// The reply is not a JSON object.
    NotJson(String),
    /// The reply's transfer parameters have the wrong type.
    BadParams(String),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::NotJson(e) => write!(f, "reply is not a JSON object: {e}"),
            ReplyError::BadParams(e) => f.write_str(e),
        }
    }
}

impl Connector {
    /// The flag value naming this connector.
    pub fn name(self) -> &'static str {
        match self {
            Connector::NixlV2 => "nixlv2",
            Connector::Nixl => "nixl",
            Connector::LmCache => "lmcache",
        }
    }

    /// Whether the prefiller pins KV blocks for the decoder after answering. For these
    /// connectors a decode that is never sent strands the blocks until vLLM's timeout.
    pub fn pins_prefill_blocks(self) -> bool {
        matches!(self, Connector::NixlV2 | Connector::Nixl)
    }

    /// The prefill leg's body: the API's one-token edits, then the connector's own.
    pub fn prefill_body(self, api: Api, request: &JsonObject<'_>) -> Spliced {
        let mut scratch = String::new();
        let mut edits = api.prefill_edits(request, &mut scratch);
        edits.extend_from_slice(self.prefill_edits());
        request.rewrite(&edits)
    }

    /// The connector's own edits of the prefill leg: the transfer fields it asks with, and
    /// the removal of any a client may have injected (only the prefiller's reply sets them).
    pub fn prefill_edits(self) -> &'static [(&'static str, Edit<'static>)] {
        match self {
            Connector::NixlV2 => &nixlv2::PREFILL_EDITS,
            Connector::Nixl => &nixl::PREFILL_EDITS,
            Connector::LmCache => &[],
        }
    }

    /// The decode leg, built from the client's request and the prefiller's 2xx reply.
    pub fn decode_plan(
        self,
        request: &JsonObject<'_>,
        original: &Bytes,
        reply: &Bytes,
    ) -> Result<DecodePlan, ReplyError> {
        match self {
            Connector::NixlV2 => nixlv2::decode_plan(request, reply),
            Connector::Nixl => nixl::decode_plan(request, reply),
            Connector::LmCache => Ok(lmcache::decode_plan(original)),
        }
    }
}

impl Connector {
    /// The request for a decoder that prefills locally (no KV handoff): the client's request
    /// without any transfer fields, which only a prefiller may set.
    pub fn local_decode_body(self, request: &JsonObject<'_>, original: &Bytes) -> Spliced {
        let transfer_fields: &[(&str, Edit<'_>)] = match self {
            Connector::NixlV2 => &[("kv_transfer_params", Edit::Remove)],
            Connector::Nixl => &[
                ("kv_transfer_params", Edit::Remove),
                ("do_remote_decode", Edit::Remove),
                ("do_remote_prefill", Edit::Remove),
                ("remote_block_ids", Edit::Remove),
                ("remote_engine_id", Edit::Remove),
                ("remote_host", Edit::Remove),
                ("remote_port", Edit::Remove),
            ],
            Connector::LmCache => return Spliced::from(original.clone()),
        };
        request.rewrite(transfer_fields)
    }
}

impl FromStr for Connector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nixlv2" => Ok(Connector::NixlV2),
            "nixl" => Ok(Connector::Nixl),
            // pd-sidecar's name for it since llm-d-router#509.
            "lmcache" | "shared-storage" => Ok(Connector::LmCache),
            other => Err(format!(
                "unknown connector '{other}' (expected nixlv2, nixl, shared-storage or lmcache)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_names_round_trip() {
        for c in [Connector::NixlV2, Connector::Nixl, Connector::LmCache] {
            assert_eq!(c.name().parse::<Connector>().unwrap(), c);
        }
        assert!("sglang"
            .parse::<Connector>()
            .unwrap_err()
            .contains("nixlv2"));
    }
}
