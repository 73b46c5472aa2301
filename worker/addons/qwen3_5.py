"""Qwen3.5 and Qwen3.5-MoE (the vision variants): Qwen3-VL's vision tower without deepstack, and a hybrid text model
(gated-delta layers, a full-attention layer every ``full_attention_interval``) whose attention layers
rotate a part of each head (``partial_rotary_factor``) with interleaved M-RoPE. Only the attention
layers get positions (``install_mrope`` skips the gated-delta ones)."""

from .qwen3_vl import Qwen3VLAddOn


class Qwen35AddOn(Qwen3VLAddOn):
    family = "qwen3_5"
    module = "qwen3_5"
    language_module = "qwen3_5"

    def rotary(self, tc):
        rp = tc.rope_parameters
        head_dim = tc.head_dim or tc.hidden_size // tc.num_attention_heads
        return self.language.Qwen3_5RotaryEmbedding(
            int(head_dim * rp["partial_rotary_factor"]), max_position_embeddings=tc.max_position_embeddings,
            base=rp["rope_theta"], mrope_section=rp["mrope_section"])


class Qwen35MoeAddOn(Qwen35AddOn):
    family = "qwen3_5_moe"
    module = "qwen3_5_moe"
