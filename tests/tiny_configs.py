"""Tiny Llama 4 text configs, each in Meta's params.json form and in our config form."""

from __future__ import annotations

from modeling_llama4 import Llama4TextConfig

VOCAB = 320

# Scout-like: every layer MoE, scaled RoPE, QK norm, NoPE every 4th layer, temperature tuning that kicks in
# within the test sequence (floor_scale 4), chunks (8) shorter than the sequence.
SCOUT_LIKE = dict(
    dim=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=VOCAB,
    multiple_of=16,
    ffn_dim_multiplier=1.0,
    ffn_exp=2.0,
    norm_eps=1e-5,
    attention_chunk_size=8,
    use_scaled_rope=True,
    nope_layer_interval=4,
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=4,
    max_seq_len=128,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=1),
)

# Maverick-like: MoE every second layer (dense layers between), no QK norm, no scaled RoPE.
MAVERICK_LIKE = dict(
    SCOUT_LIKE,
    use_scaled_rope=False,
    use_qk_norm=False,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=2),
)


def text_config_from_meta(args: dict, **overrides) -> Llama4TextConfig:
    """Our config for a tiny Meta params dict (Meta's sizing formulas, spelled out for the test sizes)."""
    dim, multiple_of = args["dim"], args["multiple_of"]
    moe = args["moe_args"]
    expert_hidden = int(int(2 * int(args["ffn_exp"] * dim) / 3) * args["ffn_dim_multiplier"] / 2)  # auto_scale_F
    expert_hidden += -expert_hidden % multiple_of
    dense_hidden = int(args["ffn_dim_multiplier"] * int(2 * 4 * dim / 3))
    dense_hidden += -dense_hidden % multiple_of
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if args["use_scaled_rope"]:
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=16.0,
            low_freq_factor=1.0,
            high_freq_factor=1.0,
            original_max_position_embeddings=8192,
        )
    fields = dict(
        vocab_size=args["vocab_size"],
        hidden_size=dim,
        intermediate_size=expert_hidden,
        intermediate_size_mlp=dense_hidden,
        num_hidden_layers=args["n_layers"],
        num_attention_heads=args["n_heads"],
        num_key_value_heads=args["n_kv_heads"],
        head_dim=dim // args["n_heads"],
        rms_norm_eps=args["norm_eps"],
        rope_parameters=rope,
        no_rope_layer_interval=args["nope_layer_interval"],
        attention_chunk_size=args["attention_chunk_size"],
        use_qk_norm=args["use_qk_norm"],
        attn_temperature_tuning=args["attn_temperature_tuning"],
        floor_scale=args["floor_scale"],
        num_local_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        interleave_moe_layer_step=moe["interleave_moe_layer_step"],
        max_position_embeddings=args["max_seq_len"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return Llama4TextConfig(**fields)
