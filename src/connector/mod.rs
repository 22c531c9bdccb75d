//! The P/D connectors: how each one rewrites the prefill leg and builds the decode leg.
//!
//! Connectors are pure functions over request bytes; the network flow lives in `pd/` and is
//! written once for all of them. What a one-token prefill changes per route is `api.rs`'s.

mod mooncake;
mod nixl;
mod nixlv2;
mod offloading;
mod sglang;
mod shared_storage;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::api::Api;
use crate::json_edit::{Edit, JsonObject, Spliced};

pub use mooncake::{parse_query, Engine};
pub use shared_storage::BELOW_THRESHOLD;

/// The connector selected by `-connector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connector {
    /// vLLM's NixlConnector: handoff through `kv_transfer_params` (the default).
    NixlV2,
    /// The legacy llm-d fork protocol: top-level `do_remote_*` and `remote_*` fields.
    Nixl,
    /// Shared storage (LMCache, vLLM's ExampleConnector): prefill with one token, then the
    /// untouched request; decode first when the client set `cache_hit_threshold`.
    SharedStorage,
    /// SGLang: both legs at once, paired through the prefill server's bootstrap room.
    SgLang,
    /// vLLM's OffloadingConnector, P2P tier: the decoder pulls from the prefiller's P2P port.
    Offloading,
    /// vLLM's MooncakeConnector: both legs at once, one `transfer_id`, the prefiller's engine
    /// found through its bootstrap server.
    Mooncake,
}

/// How a connector's two legs are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The prefill first; its reply (or its success) shapes the decode leg.
    Sequential,
    /// Both at once: the decoder waits for the prefilled KV cache itself.
    Concurrent,
    /// The decoder first, with the client's request: it answers unless too little of the
    /// prompt is cached (`finish_reason: "cache_threshold"`); then prefill, then decode.
    DecodeFirst,
}

/// The request member that asks a shared-storage decoder to refuse a prompt it has too
/// little of cached (llm-d's decode-first; vllm#24256).
pub const CACHE_HIT_THRESHOLD: &str = "cache_hit_threshold";

/// What pairs one request's two legs besides the client's body and the prefiller: the ids
/// the sidecar made up for the transfer and the prefill pod's ports they name. Cheap to
/// clone unless a Mooncake engine or a P2P source is set.
#[derive(Debug, Clone, Default)]
pub struct Pairing {
    /// The id the sidecar makes up for the transfer: OffloadingConnector's and a P2P pull's
    /// `kv_request_id`, and (as `xfer-<id>`) Mooncake's `transfer_id`. Formatted only by the
    /// connectors that send it.
    pub id: uuid::Uuid,
    /// SGLang's `bootstrap_room`.
    pub room: u64,
    /// SGLang's bootstrap port on the prefill server (`SGLANG_BOOTSTRAP_PORT`).
    pub bootstrap_port: u16,
    /// The prefiller's P2P port (`-p2p-connector-port`).
    pub p2p_port: u16,
    /// The prefiller's Mooncake bootstrap port (`-mooncake-bootstrap-port`).
    pub mooncake_port: u16,
    /// The prefiller's engine, from its bootstrap server (Mooncake only).
    pub engine: Engine,
    /// The peer a nixlv2 prefill pulls a cached prefix from (`-enable-p2p-pull`), with
    /// `id` naming the pull.
    pub kv_source_host: Option<String>,
    /// Tokenize once (`-tokenize-once`, nixlv2 chat): the prefill asks for the prompt's token
    /// ids, and the decode hands them to the decoder in `kv_transfer_params.prompt_token_ids`.
    pub tokenize_once: bool,
}

/// The ports a connector's pairing names on the prefill pod.
#[derive(Debug, Clone, Copy)]
pub struct PairingPorts {
    pub sglang_bootstrap: u16,
    pub p2p: u16,
    pub mooncake_bootstrap: u16,
}

impl Default for PairingPorts {
    fn default() -> Self {
        Self {
            sglang_bootstrap: 8998,
            p2p: 7777,
            mooncake_bootstrap: 8998,
        }
    }
}

impl Pairing {
    /// A fresh pairing.
    pub fn new(ports: PairingPorts) -> Self {
        let bytes = crate::runtime::ids::next_bytes::<16>();
        let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        // SGLang reads the room as a signed 64-bit integer: keep it non-negative.
        let room = u64::from_le_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
        ]) >> 1;
        Self {
            id,
            room,
            bootstrap_port: ports.sglang_bootstrap,
            p2p_port: ports.p2p,
            mooncake_port: ports.mooncake_bootstrap,
            engine: Engine::default(),
            kv_source_host: None,
            tokenize_once: false,
        }
    }
}

impl Pairing {
    /// The `kv_request_id` of a pull from the KV cache source: apart from the transfer's id,
    /// under which an offloading prefiller stores what the decoder pulls. Still a uuid4 (only
    /// the last byte differs).
    fn source_pull_id(&self) -> uuid::Uuid {
        uuid::Uuid::from_u128(self.id.as_u128() ^ 0xff)
    }
}

/// `remote_kv_source`'s value (vLLM's P2P tier): pull a cached prefix from the peer's P2P
/// port. `None` without a source.
fn remote_kv_source(pairing: &Pairing) -> Option<String> {
    let host = pairing.kv_source_host.as_deref()?;
    Some(format!(
        r#"{{"kv_request_id":"{}","remote_host":"{}","remote_port":{}}}"#,
        pairing.source_pull_id(),
        unbracketed(host),
        pairing.p2p_port
    ))
}

/// A decoder-only request with a KV cache source (no prefiller named): `kv_transfer_params`
/// becomes the pull alone, the client's own keys dropped, as pd-sidecar does.
pub fn with_kv_source(request: &JsonObject<'_>, pairing: &Pairing) -> Option<Spliced> {
    let params = format!(r#"{{"remote_kv_source":{}}}"#, remote_kv_source(pairing)?);
    Some(request.rewrite(&[("kv_transfer_params", Edit::Set(&params))]))
}

/// SGLang and vLLM's P2P tier join host and port themselves: an IPv6 host goes bare.
fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
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
            Connector::SharedStorage => "shared-storage",
            Connector::SgLang => "sglang",
            Connector::Offloading => "offloading",
            Connector::Mooncake => "mooncake",
        }
    }

    /// How the two legs of `request` are ordered.
    pub fn flow(self, request: &JsonObject<'_>) -> Flow {
        match self {
            Connector::SgLang | Connector::Mooncake => Flow::Concurrent,
            Connector::SharedStorage if request.get(CACHE_HIT_THRESHOLD).is_some() => {
                Flow::DecodeFirst
            }
            _ => Flow::Sequential,
        }
    }

    /// Whether the prefiller pins KV blocks for the decoder after answering. For these
    /// connectors a decode that is never sent strands the blocks until vLLM's timeout.
    pub fn pins_prefill_blocks(self) -> bool {
        matches!(
            self,
            Connector::NixlV2 | Connector::Nixl | Connector::Offloading
        )
    }

    /// The prefill leg's body for the prefiller on `prefiller_host` (IPv6 in brackets): the
    /// API's one-token edits, then the connector's own. SGLang's prefill is the decode's
    /// request itself (its prefill server stops after the prefill).
    pub fn prefill_body(
        self,
        api: Api,
        request: &JsonObject<'_>,
        pairing: &Pairing,
        prefiller_host: &str,
    ) -> Spliced {
        if self == Connector::SgLang {
            return sglang::body(request, pairing, prefiller_host);
        }
        let mut scratch = String::new();
        let mut edits = api.prefill_edits(request, &mut scratch);
        edits.extend_from_slice(self.prefill_edits());
        let own = match self {
            Connector::Offloading => Some(offloading::prefill_params(pairing)),
            Connector::Mooncake => Some(mooncake::prefill_params(pairing)),
            Connector::NixlV2 => nixlv2::prefill_params_with_source(pairing),
            _ => None,
        };
        if let Some(params) = &own {
            // One edit per key: a second one for the same key would be appended twice.
            edits.retain(|(k, _)| *k != "kv_transfer_params");
            edits.push(("kv_transfer_params", Edit::Set(params)));
        }
        if pairing.tokenize_once && self == Connector::NixlV2 && api == Api::ChatCompletions {
            edits.push(("return_token_ids", Edit::Set("true")));
        }
        request.rewrite(&edits)
    }

    /// The connector's own edits of the prefill leg: the transfer fields it asks with, and
    /// the removal of any a client may have injected (only the prefiller's reply sets them).
    pub fn prefill_edits(self) -> &'static [(&'static str, Edit<'static>)] {
        match self {
            Connector::NixlV2 => &nixlv2::PREFILL_EDITS,
            Connector::Nixl => &nixl::PREFILL_EDITS,
            Connector::SharedStorage => &shared_storage::ZERO_THRESHOLD,
            Connector::SgLang | Connector::Offloading | Connector::Mooncake => &[],
        }
    }

    /// The decode leg, built from the client's request, the prefiller's 2xx reply, the
    /// request's pairing and the host of the prefiller that answered (a retry may have moved
    /// on from the first).
    pub fn decode_plan(
        self,
        request: &JsonObject<'_>,
        original: &Bytes,
        reply: &Bytes,
        pairing: &Pairing,
        prefiller_host: &str,
    ) -> Result<DecodePlan, ReplyError> {
        match self {
            Connector::NixlV2 => nixlv2::decode_plan(request, reply, pairing.tokenize_once),
            Connector::Nixl => nixl::decode_plan(request, reply),
            Connector::SharedStorage => Ok(shared_storage::decode_plan(request, original)),
            Connector::SgLang => Ok(DecodePlan {
                body: sglang::body(request, pairing, prefiller_host),
                handoff: Handoff::Remote,
            }),
            Connector::Offloading => Ok(offloading::decode_plan(request, pairing, prefiller_host)),
            Connector::Mooncake => Ok(mooncake::decode_plan(request, pairing, prefiller_host)),
        }
    }
}

impl Connector {
    /// The request for a decoder that prefills locally (no KV handoff): the client's request
    /// without any transfer fields, which only a prefiller may set.
    pub fn local_decode_body(self, request: &JsonObject<'_>, original: &Bytes) -> Spliced {
        let transfer_fields: &[(&str, Edit<'_>)] = match self {
            Connector::NixlV2 | Connector::Offloading | Connector::Mooncake => {
                &[("kv_transfer_params", Edit::Remove)]
            }
            Connector::SgLang => &[
                ("bootstrap_host", Edit::Remove),
                ("bootstrap_port", Edit::Remove),
                ("bootstrap_room", Edit::Remove),
            ],
            Connector::Nixl => &[
                ("kv_transfer_params", Edit::Remove),
                ("do_remote_decode", Edit::Remove),
                ("do_remote_prefill", Edit::Remove),
                ("remote_block_ids", Edit::Remove),
                ("remote_engine_id", Edit::Remove),
                ("remote_host", Edit::Remove),
                ("remote_port", Edit::Remove),
            ],
            Connector::SharedStorage => return shared_storage::decode_plan(request, original).body,
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
            "sglang" => Ok(Connector::SgLang),
            "offloading" => Ok(Connector::Offloading),
            "mooncake" => Ok(Connector::Mooncake),
            // pd-sidecar's name for it since llm-d-router#509.
            "lmcache" | "shared-storage" => Ok(Connector::SharedStorage),
            other => Err(format!(
                "unknown connector '{other}' (expected nixlv2, nixl, shared-storage, lmcache, sglang, mooncake or offloading)"
            )),
        }
    }
}

/// A completion's prefill body from `connector` for `request`, as text (for the connectors'
/// tests).
#[cfg(test)]
fn completion_prefill(connector: Connector, request: &'static str, pairing: &Pairing) -> String {
    let source = Bytes::from_static(request.as_bytes());
    let obj = JsonObject::parse(&source).expect("a JSON object");
    let body = connector.prefill_body(Api::Completions, &obj, pairing, "127.0.0.1");
    String::from_utf8(body.to_vec()).expect("UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_names_round_trip() {
        for c in [
            Connector::NixlV2,
            Connector::Nixl,
            Connector::SharedStorage,
            Connector::SgLang,
            Connector::Offloading,
            Connector::Mooncake,
        ] {
            assert_eq!(c.name().parse::<Connector>().unwrap(), c);
        }
        assert!("vllm".parse::<Connector>().unwrap_err().contains("nixlv2"));
    }
}
