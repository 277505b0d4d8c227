"""Multi-head Latent Attention over the compressed cache (absorbed form, as MQA with one shared key).

`mla_attention(q, cache, q_start, value_dim, scale)`: q [B, Tq, H, D] are absorbed queries
([W_UK^T q_nope ‖ q_rope], D = kv_lora_rank + rope dim); cache [B, Tk, D] holds the normalised latent
followed by the shared key part; the value of a key is its first `value_dim` entries. Query i sits at
position q_start + i and sees keys 0 .. q_start + i. Returns the attended latent [B, Tq, H, value_dim]
in float32.
"""

from kimi_desk.kernels.mla.naive import mla_attention_torch

__all__ = ["mla_attention"]


def mla_attention(q, cache, q_start, value_dim, scale):
    return mla_attention_torch(q, cache, q_start, value_dim, scale)
