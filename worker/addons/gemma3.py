"""Gemma 3: SigLIP tower + soft-token projector; each image becomes mm_tokens_per_image tokens."""

from .base import VisionAddOn


class Gemma3AddOn(VisionAddOn):
    family = "gemma3"
    module = "gemma3"
    processor_path = "gemma3.processing_gemma3:Gemma3Processor"
    placeholder = "<start_of_image>"

    def build_modules(self, parts):
        parts.vision_tower = self.mod.VisionModel(self.mc.vision_config)
        parts.multi_modal_projector = self.mod.gemma3.Gemma3MultiModalProjector(self.mc)

    def split(self, inputs, n):
        pv = inputs["pixel_values"]
        return [(pv[i:i + 1], {}) for i in range(n)]

    def encode(self, pv, extras):
        parts = self.parts
        dtype = parts.multi_modal_projector.mm_input_projection_weight.dtype
        hidden, _, _ = parts.vision_tower(pv.transpose(0, 2, 3, 1).astype(dtype), output_hidden_states=True)
        return parts.multi_modal_projector(hidden)  # [1, tokens, hidden]
