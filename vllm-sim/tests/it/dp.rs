//! `--data-parallel-size`: N ranks, each a whole instance on its own ports.

use crate::support::*;
use vllm_sim::{rank_config, spawn_ranks, SimConfig};

#[test]
fn fixed_ports_move_up_by_the_rank_and_ephemeral_ones_stay() {
    let base = SimConfig {
        port: 8200,
        side_channel_port: 5600,
        bootstrap_port: 0,
        engine_id: Some("decode".into()),
        ..SimConfig::default()
    };
    let r1 = rank_config(&base, 1).unwrap();
    assert_eq!(
        (r1.port, r1.side_channel_port, r1.bootstrap_port),
        (8201, 5601, 0)
    );
    assert_eq!(r1.engine_id.as_deref(), Some("decode_dp1"));
    let r0 = rank_config(&base, 0).unwrap();
    assert_eq!((r0.port, r0.engine_id.as_deref()), (8200, Some("decode")));
    let top = SimConfig {
        port: 65535,
        ..SimConfig::default()
    };
    let e = rank_config(&top, 1).unwrap_err();
    assert!(e.to_string().contains("past 65535"), "{e}");
}

#[tokio::test]
async fn each_rank_serves_and_counts_its_own_requests() {
    bounded(async {
        let ranks = spawn_ranks(SimConfig::default(), 2).await.unwrap();
        assert_eq!(ranks.len(), 2);
        assert_ne!(ranks[0].api_addr(), ranks[1].api_addr());
        assert_ne!(ranks[0].engine_id(), ranks[1].engine_id());
        let reply = post(
            ranks[1].api_addr(),
            "/v1/completions",
            r#"{"prompt":"a b c","max_tokens":2}"#,
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(state(&ranks[0]).await["counters"]["requests_total"], 0);
        assert_eq!(state(&ranks[1]).await["counters"]["requests_total"], 1);
    })
    .await;
}
