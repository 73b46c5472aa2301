"""Mistral 3 (Mistral-Small-3.1 style): Pixtral encoder + patch-merging projector (needs image_sizes)."""

import mlx.core as mx

from .pixtral import PixtralAddOn


class Mistral3AddOn(PixtralAddOn):
    family = "mistral3"
    module = "mistral3"
    processor_path = "mistral3.processing_mistral3:Mistral3Processor"

    def build_modules(self, parts):
        parts.vision_tower = self.mod.VisionModel(self.mc.vision_config)
        parts.multi_modal_projector = self.mod.mistral3.Mistral3MultiModalProjector(self.mc)
        parts.vision_feature_layer = self.mc.vision_feature_layer

    def encode(self, pv, extras):
        sizes = extras["image_sizes"]
        selected = self.features(pv, sizes)
        if selected.ndim == 3 and selected.shape[0] == 1:
            selected = selected.squeeze(0)
        return self.parts.multi_modal_projector(selected, sizes)  # [n, D]

    def join(self, feats):
        return mx.concatenate(feats, axis=0)
