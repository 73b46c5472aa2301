"""Qwen2.5-VL: windowed-attention vision tower; the same M-RoPE text positions as Qwen2-VL."""

from .qwen2_vl import Qwen2VLAddOn


class Qwen25VLAddOn(Qwen2VLAddOn):
    family = "qwen2_5_vl"
    module = "qwen2_5_vl"
    processor_path = "qwen2_5_vl.processing_qwen2_5_vl:Qwen2_5_VLProcessor"
