//! vLLM P/D simulator (`vllm-sim`).
