"""LFM2-VL: a SigLIP2 packed-patch encoder, pixel-unshuffle and an MLP projector beside mlx-lm's LFM2.

The checkpoint's model_type is "lfm2-vl" (mlx-lm's text module ``lfm2-vl.py``, mlx-vlm's package
``lfm2_vl``). A large image is split by the processor into tiles plus a thumbnail: each view is one row
of ``pixel_values`` (padded to ``max_num_patches``, ``pixel_attention_mask`` marks its patches), and the
image's features are its views' features in prompt order, as mlx-vlm's ``encode_images`` returns them.
"""

import mlx.core as mx
import mlx.nn as nn

from .base import VisionAddOn


class Lfm2VlAddOn(VisionAddOn):
    family = "lfm2-vl"
    module = "lfm2_vl"
    processor_path = "lfm2_vl.processing_lfm2_vl:Lfm2VlProcessor"
    placeholder = "<image>"

    def build_modules(self, parts):
        mc, lfm = self.mc, self.mod.lfm2_vl
        parts.vision_tower = self.mod.VisionModel(mc.vision_config)
        if mc.vision_feature_layer != -1:  # as mlx-vlm's Model: later encoder layers are dropped
            parts.vision_tower.encoder.layers = parts.vision_tower.encoder.layers[:mc.vision_feature_layer + 1]
        parts.pixel_unshuffle = lfm.PixelUnshuffleBlock(mc.downsample_factor) if mc.downsample_factor > 1 \
            else nn.Identity()
        parts.multi_modal_projector = lfm.Lfm2VlMultiModalProjector(mc)

    def split(self, inputs, n):
        """Every view (tiles, thumbnail) of one image; the base processes each image alone."""
        if n != 1:
            raise ValueError("LFM2-VL images are processed one at a time")
        keys = ("spatial_shapes", "pixel_attention_mask")
        return [(mx.array(inputs["pixel_values"]), {k: mx.array(inputs[k]) for k in keys})]

    def encode(self, pv, extras):
        views = self.mod.Model.encode_images(self.parts, pv, **extras)
        return mx.concatenate(views, axis=0)  # [tokens, hidden]
