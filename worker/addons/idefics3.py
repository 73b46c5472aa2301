"""Idefics3 and SmolVLM: a SigLIP tower + pixel-shuffle connector beside mlx-lm's llama.

mlx-lm has no idefics3 text module: the text model is loaded as mlx-lm's llama
(worker/patches/idefics3_llama.py). The processor splits a large image into tiles plus a global image,
each tile ``image_seq_len`` image tokens between ``<fake_token_around_image>`` / ``<row_r_col_c>`` /
``<global-img>`` markers; an image processed alone gives the same tiles and text as within a prompt
of several (every tile is resized to ``max_image_size`` exactly, so nothing is padded across images).
"""

import importlib
import types

import mlx.core as mx

from .base import VisionAddOn


class Idefics3AddOn(VisionAddOn):
    family = "idefics3"
    module = "idefics3"
    processor_path = "idefics3.processing_idefics3:Idefics3Processor"
    placeholder = "<image>"
    weight_keys = ("vision_model", "connector")
    tower_attr = "vision_model"

    def __init__(self, path, config, text_model, options):
        super().__init__(path, config, text_model, options)
        patch = self.mc.vision_config.patch_size  # get_input_embeddings reads a 5-D pixel_values even
        self.cached_pixels = mx.ones((1, 1, 1, patch, patch))  # when given cached features

    def _language_stub(self, embed):
        stub = super()._language_stub(embed)
        stub.embed_tokens = embed  # idefics3 reads language_model.embed_tokens
        return stub

    def build_modules(self, parts):
        connector = importlib.import_module("mlx_vlm.models.idefics3.idefics3").Idefics3Connector
        parts.vision_model = self.mod.VisionModel(self.mc.vision_config)
        parts.connector = connector(self.mc)
        merge = types.MethodType(self.mod.Model._prepare_inputs_for_multimodal, parts)  # not a staticmethod
        object.__setattr__(parts, "_prepare_inputs_for_multimodal", merge)

    def split(self, inputs, n):
        """All tiles of one image (the base processes each image alone)."""
        if n != 1:
            raise ValueError("Idefics3 images are processed one at a time")
        count = int((mx.array(inputs["input_ids"]) == self.image_token_id).sum().item())
        mask = inputs.get("pixel_attention_mask")
        return [(mx.array(inputs["pixel_values"]),
                 {"pixel_attention_mask": None if mask is None else mx.array(mask), "count": count})]

    def encode(self, pv, extras):
        """mlx-vlm has no image encoder of its own here: its ``get_input_embeddings`` over a prompt of
        only image tokens returns exactly the image's features (tower, connector, in tile order)."""
        ids = mx.full((1, extras["count"]), self.image_token_id, dtype=mx.int32)
        out = self.mod.Model.get_input_embeddings(self.parts, ids, pv,
                                                  pixel_attention_mask=extras["pixel_attention_mask"])
        return out.inputs_embeds[0]  # [tokens, hidden]


class SmolVLMAddOn(Idefics3AddOn):
    family = "smolvlm"
    module = "smolvlm"
    processor_path = "smolvlm.processing_smolvlm:SmolVLMProcessor"
