"""mlx-lm 0.32.2 has no idefics3 / smolvlm text model: ``mlx_lm.utils.load_model`` on such a checkpoint raises
ValueError "Model type idefics3 not supported." (there is no ``mlx_lm/models/idefics3.py``; mlx-vlm 0.7.10 has
only the full vision-language model). Their text model is a llama (mlx-vlm's idefics3 language model), so here
it is loaded as mlx-lm's llama: ``text_model_classes`` gives ``load_model`` the classes to use.

Pinned by tests/unit/test_patches.py::test_mlx_lm_has_no_idefics3_text_model.
"""

from typing import Optional

from mlx_lm.models import llama

LLAMA_TEXT_FAMILIES = ("idefics3", "smolvlm")


def llama_text_args(config: dict) -> dict:
    """mlx-lm llama's config for the text model of an idefics3 / smolvlm checkpoint, as mlx-vlm runs it
    (its idefics3 language model, with its defaults): head_dim = hidden / heads, plain RoPE (no
    rope_scaling), an lm_head of its own."""
    text = config.get("text_config") or {}
    hidden = text["hidden_size"]
    heads = text.get("num_attention_heads") or hidden // text["head_dim"]  # smolvlm may give head_dim only
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=text.get("num_hidden_layers", 32),
                intermediate_size=text["intermediate_size"], num_attention_heads=heads,
                num_key_value_heads=text.get("num_key_value_heads") or heads, head_dim=hidden // heads,
                rms_norm_eps=text.get("rms_norm_eps", 1e-5), vocab_size=text["vocab_size"],
                rope_theta=text.get("rope_theta", 1000000.0), rope_traditional=text.get("rope_traditional", False),
                max_position_embeddings=text.get("max_position_embeddings", 4096), tie_word_embeddings=False)


def llama_weight_name(name: str) -> Optional[str]:
    """mlx-lm llama's name of an idefics3 text weight (mlx-vlm's layout or the HF one); None for the
    vision tower and connector."""
    for old, new in (("language_model.lm_head.", "lm_head."), ("language_model.", "model."),
                     ("model.text_model.", "model."), ("lm_head.", "lm_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    return None


class LlamaTextArgs:
    """``load_model``'s args class for LLAMA_TEXT_FAMILIES: llama's args from the text_config."""

    @staticmethod
    def from_dict(config: dict) -> llama.ModelArgs:
        return llama.ModelArgs.from_dict(llama_text_args(config))


class LlamaText(llama.Model):
    """mlx-lm's llama over an idefics3 / smolvlm checkpoint's text weights."""

    def sanitize(self, weights):
        named = ((llama_weight_name(k), v) for k, v in weights.items())
        return super().sanitize({k: v for k, v in named if k is not None})


def text_model_classes(config: dict) -> dict:
    """``load_model`` keyword arguments that pick the text model classes where mlx-lm's own lookup
    (by model_type) has none."""
    if config.get("model_type") in LLAMA_TEXT_FAMILIES:
        return {"get_model_classes": lambda config: (LlamaText, LlamaTextArgs)}
    return {}
