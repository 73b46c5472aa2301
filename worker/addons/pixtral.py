"""Pixtral: the Pixtral vision encoder + a Llava projector; rows of [IMG] tokens with [IMG_BREAK]s."""

import mlx.core as mx

from .base import VisionAddOn


class PixtralAddOn(VisionAddOn):
    family = "pixtral"
    module = "pixtral"
    processor_path = "pixtral.processing_pixtral:PixtralProcessor"
    placeholder = "[IMG]"

    def build_modules(self, parts):
        parts.vision_tower = self.mod.VisionModel(self.mc.vision_config)
        parts.multi_modal_projector = self.mod.pixtral.LlavaMultiModalProjector(self.mc)
        parts.vision_feature_layer = self.mc.vision_feature_layer

    def split(self, inputs, n):
        pv, sizes = inputs["pixel_values"], inputs.get("image_sizes")
        if isinstance(pv, list):
            pv = [mx.array(p) for p in pv]
        out = []
        for i in range(n):
            p = pv[i] if isinstance(pv, list) else pv[i:i + 1]
            if p.ndim == 3:
                p = p[None]
            out.append((p, {"image_sizes": None if sizes is None else sizes[i:i + 1]}))
        return out

    def features(self, pv, sizes):
        *_, hidden = self.parts.vision_tower(pv.transpose(0, 2, 3, 1), output_hidden_states=True,
                                             image_sizes=sizes)
        return hidden[self.parts.vision_feature_layer]

    def encode(self, pv, extras):
        return self.parts.multi_modal_projector(self.features(pv, extras["image_sizes"]))  # [1, n, D]

    def join(self, feats):
        return mx.concatenate(feats, axis=1)
