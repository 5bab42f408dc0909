from headwise.models.loader import (
    SUPPORTED_MODEL_TYPES,
    check_model_dir,
    default_model_dir,
    install_default_model,
    load_model,
    model_id,
    resolve_model_path,
)
from headwise.models.runner import DecodeStats, ModelRunner, PrefillOutput, SegmentResult
from headwise.models.sampling import SamplingParams

__all__ = [
    "SUPPORTED_MODEL_TYPES", "DecodeStats", "ModelRunner", "PrefillOutput", "SamplingParams", "SegmentResult",
    "check_model_dir", "default_model_dir", "install_default_model", "load_model", "model_id", "resolve_model_path",
]
