//! Simulator configuration: CLI flags (spec §7.2), their enums, and the runtime merge-patch.

use clap::{ArgAction, Parser};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;

/// Declares a string-valued enum usable from clap (`FromStr`) and serde (snake/custom names).
macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $s)] $var),+ }
        impl $name {
            pub fn as_str(self) -> &'static str { match self { $(Self::$var => $s),+ } }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($s => Ok(Self::$var),)+ _ => Err(format!("invalid value {s:?}, expected one of: {}", [$($s),+].join(", "))) }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

str_enum!(
    /// Which vLLM generation of `kv_transfer_params` to emulate (§1.3).
    Era { A => "A", B => "B", C => "C" }
);
str_enum!(
    /// Wire protocol of the P/D handoff (§7.5).
    Protocol {
        Nixlv2 => "nixlv2", NixlV1 => "nixl-v1", Lmcache => "lmcache",
        Sglang => "sglang", Offloading => "offloading", Mooncake => "mooncake",
    }
);
str_enum!(
    /// The instance's fixed role, used where the body does not say (`sglang`, §7.18).
    Role { Auto => "auto", Prefill => "prefill", Decode => "decode" }
);
str_enum!(
    /// P-side lease expiry model (§7.8).
    LeaseMode { Fixed => "fixed", Heartbeat => "heartbeat" }
);
str_enum!(
    /// Decoder action when the prefiller does not know the lease (§7.10.1).
    OnUnknownLease { Fail => "fail", Stale => "stale" }
);
str_enum!(
    /// Decoder action on malformed `kv_transfer_params` (§7.10.1).
    OnInvalidKvParams { Reject => "reject", Recompute => "recompute" }
);
str_enum!(
    /// Error body shape (§4.3).
    ErrorFormat { Current => "current", Legacy => "legacy" }
);
str_enum!(
    /// Output text generation mode (§7.11).
    OutputMode { Tokens => "tokens", Echo => "echo" }
);

/// All settings of one simulated vLLM instance. Field names are the snake_case flag names,
/// which is also what `POST /sim/config` patches.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimConfig {
    pub host: String,
    pub port: u16,
    pub side_channel_host: Option<String>,
    pub side_channel_port: u16,
    pub model: String,
    pub max_model_len: u64,
    pub engine_id: Option<String>,
    pub kv_params_era: Era,
    pub protocol: Protocol,
    pub block_size: u64,
    pub num_gpu_blocks: u32,
    pub lease_mode: Option<LeaseMode>,
    pub abort_request_timeout_ms: u64,
    pub kv_lease_duration_ms: u64,
    pub max_num_seqs: u64,
    pub ttft_ms: u64,
    pub prefill_ms_per_token: f64,
    pub kv_transfer_ms: u64,
    pub kv_transfer_ms_per_token: f64,
    pub itl_ms: u64,
    pub jitter_pct: f64,
    pub default_max_tokens_chat: u64,
    pub eos_after: Option<u64>,
    pub on_unknown_lease: OnUnknownLease,
    pub on_invalid_kv_params: OnInvalidKvParams,
    pub notify_on_reject: bool,
    pub enable_request_id_headers: bool,
    pub enable_force_include_usage: bool,
    pub error_format: ErrorFormat,
    pub request_log_size: usize,
    pub mode: OutputMode,
    pub seed: u64,
    pub lmcache_peer: Option<String>,
    pub role: Role,
    pub bootstrap_port: u16,
    pub bootstrap_timeout_ms: u64,
    pub p2p_load_timeout_ms: u64,
    pub mm_encoder_only: bool,
    pub encode_delay_ms: u64,
}

impl Default for SimConfig {
    /// Spec defaults, except both ports are ephemeral so in-process tests never collide.
    fn default() -> Self {
        SimArgs::parse_from(["vllm-sim", "--port", "0"]).into_config()
    }
}

impl SimConfig {
    /// Effective lease mode: explicit flag, else heartbeat for era C and fixed otherwise.
    pub fn effective_lease_mode(&self) -> LeaseMode {
        self.lease_mode.unwrap_or(match self.kv_params_era {
            Era::C => LeaseMode::Heartbeat,
            _ => LeaseMode::Fixed,
        })
    }

    /// Whether this protocol hands KV over by a key on P's side channel or bootstrap
    /// listener (§7.18–§7.20) instead of NIXL params or LMCache.
    pub fn keyed_handoff(&self) -> bool {
        matches!(
            self.protocol,
            Protocol::Sglang | Protocol::Offloading | Protocol::Mooncake
        )
    }

    /// Served model names; the first one is the default.
    pub fn model_names(&self) -> Vec<String> {
        self.model
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Applies a JSON merge-patch (RFC 7386) of runtime settings; unknown keys are errors so
    /// that typos in tests fail loudly.
    pub fn merge_patch(&self, patch: &serde_json::Map<String, Value>) -> Result<SimConfig, String> {
        let mut cur = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let Value::Object(obj) = &mut cur else {
            return Err("config is not an object".into());
        };
        for (k, v) in patch {
            if !obj.contains_key(k) {
                return Err(format!("unknown setting {k:?}"));
            }
            obj.insert(k.clone(), v.clone());
        }
        serde_json::from_value(cur).map_err(|e| e.to_string())
    }
}

/// Command-line flags of the `vllm-sim` binary (spec §7.2).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "vllm-sim",
    about = "Simulated vLLM instance for P/D disaggregation tests"
)]
pub struct SimArgs {
    /// Bind address for both listeners.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// API port (0 = ephemeral).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Host advertised as `remote_host` (default: --host).
    #[arg(long)]
    pub side_channel_host: Option<String>,
    /// Side-channel port (0 = ephemeral).
    #[arg(long, default_value_t = 0)]
    pub side_channel_port: u16,
    /// Served model name(s), comma-separated; the first is the default.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    #[arg(long, default_value_t = 4096)]
    pub max_model_len: u64,
    /// `remote_engine_id` (default: random uuid4).
    #[arg(long)]
    pub engine_id: Option<String>,
    #[arg(long, default_value = "C")]
    pub kv_params_era: Era,
    #[arg(long, default_value = "nixlv2")]
    pub protocol: Protocol,
    #[arg(long, default_value_t = 16)]
    pub block_size: u64,
    #[arg(long, default_value_t = 2048)]
    pub num_gpu_blocks: u32,
    /// `fixed` or `heartbeat` (default: heartbeat for era C, fixed otherwise).
    #[arg(long)]
    pub lease_mode: Option<LeaseMode>,
    #[arg(long, default_value_t = 480_000)]
    pub abort_request_timeout_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    pub kv_lease_duration_ms: u64,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: u64,
    #[arg(long, default_value_t = 20)]
    pub ttft_ms: u64,
    #[arg(long, default_value_t = 0.0)]
    pub prefill_ms_per_token: f64,
    #[arg(long, default_value_t = 5)]
    pub kv_transfer_ms: u64,
    #[arg(long, default_value_t = 0.0)]
    pub kv_transfer_ms_per_token: f64,
    #[arg(long, default_value_t = 10)]
    pub itl_ms: u64,
    #[arg(long, default_value_t = 0.0)]
    pub jitter_pct: f64,
    #[arg(long, default_value_t = 64)]
    pub default_max_tokens_chat: u64,
    #[arg(long)]
    pub eos_after: Option<u64>,
    #[arg(long, default_value = "fail")]
    pub on_unknown_lease: OnUnknownLease,
    #[arg(long, default_value = "reject")]
    pub on_invalid_kv_params: OnInvalidKvParams,
    /// `--notify-on-reject false` restores the pre-#41269 behaviour.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub notify_on_reject: bool,
    #[arg(long)]
    pub enable_request_id_headers: bool,
    #[arg(long)]
    pub enable_force_include_usage: bool,
    #[arg(long, default_value = "current")]
    pub error_format: ErrorFormat,
    #[arg(long, default_value_t = 1000)]
    pub request_log_size: usize,
    #[arg(long, default_value = "tokens")]
    pub mode: OutputMode,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Peer side channel for `--protocol lmcache`, e.g. `http://127.0.0.1:5601`.
    #[arg(long)]
    pub lmcache_peer: Option<String>,
    /// Fixed role for `--protocol sglang` (SGLang's `--disaggregation-mode`): `prefill`,
    /// `decode`, or `auto` (bootstrap fields ignored, every request plain).
    #[arg(long, default_value = "auto")]
    pub role: Role,
    /// Bootstrap listener (sglang rooms, mooncake `/query`; 0 = ephemeral).
    #[arg(long, default_value_t = 0)]
    pub bootstrap_port: u16,
    /// How long a sglang or mooncake decode waits for its KV to be ready on P.
    #[arg(long, default_value_t = 30_000)]
    pub bootstrap_timeout_ms: u64,
    /// How long an offloading (P2P) decode waits for its KV before prefilling locally
    /// (vLLM's `_LOAD_TIMEOUT_S`).
    #[arg(long, default_value_t = 30_000)]
    pub p2p_load_timeout_ms: u64,
    /// Encoder-only instance, the E of E/PD (vLLM's flag of that name): a chat completion
    /// answers one token and `ec_transfer_params` naming its multimodal items (§7.23).
    #[arg(long)]
    pub mm_encoder_only: bool,
    /// Milliseconds an encoder-only instance works on each request before it answers
    /// (`/sim/config` key `encode_delay_ms`).
    #[arg(long, default_value_t = 0)]
    pub encode_delay_ms: u64,
    /// Data-parallel ranks: N instances, rank i on port+i (and side-channel and bootstrap
    /// ports +i when fixed), as `vllm serve --data-parallel-size N` behind llm-d's DP manifests.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub data_parallel_size: u16,
}

impl SimArgs {
    pub fn into_config(self) -> SimConfig {
        SimConfig {
            host: self.host,
            port: self.port,
            side_channel_host: self.side_channel_host,
            side_channel_port: self.side_channel_port,
            model: self.model,
            max_model_len: self.max_model_len,
            engine_id: self.engine_id,
            kv_params_era: self.kv_params_era,
            protocol: self.protocol,
            block_size: self.block_size.max(1),
            num_gpu_blocks: self.num_gpu_blocks,
            lease_mode: self.lease_mode,
            abort_request_timeout_ms: self.abort_request_timeout_ms,
            kv_lease_duration_ms: self.kv_lease_duration_ms,
            max_num_seqs: self.max_num_seqs,
            ttft_ms: self.ttft_ms,
            prefill_ms_per_token: self.prefill_ms_per_token,
            kv_transfer_ms: self.kv_transfer_ms,
            kv_transfer_ms_per_token: self.kv_transfer_ms_per_token,
            itl_ms: self.itl_ms,
            jitter_pct: self.jitter_pct,
            default_max_tokens_chat: self.default_max_tokens_chat,
            eos_after: self.eos_after,
            on_unknown_lease: self.on_unknown_lease,
            on_invalid_kv_params: self.on_invalid_kv_params,
            notify_on_reject: self.notify_on_reject,
            enable_request_id_headers: self.enable_request_id_headers,
            enable_force_include_usage: self.enable_force_include_usage,
            error_format: self.error_format,
            request_log_size: self.request_log_size,
            mode: self.mode,
            seed: self.seed,
            lmcache_peer: self.lmcache_peer,
            role: self.role,
            bootstrap_port: self.bootstrap_port,
            bootstrap_timeout_ms: self.bootstrap_timeout_ms,
            p2p_load_timeout_ms: self.p2p_load_timeout_ms,
            mm_encoder_only: self.mm_encoder_only,
            encode_delay_ms: self.encode_delay_ms,
        }
    }
}

impl From<SimArgs> for SimConfig {
    fn from(a: SimArgs) -> Self {
        a.into_config()
    }
}
