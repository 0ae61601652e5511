"""Concept datasets (images, captions, masks) and their seeded transforms."""

from .concept import (
    IMAGE_EXTENSIONS,
    ConceptDataError,
    ConceptDataset,
    ConceptSample,
    ConceptSource,
    collate,
    load_concept_list,
    load_prompt_list,
    scan_concept,
)
from .transforms import (
    DEFAULT_TEMPLATES,
    apply_template,
    pad_to_square,
    replace_tokens,
    shuffle_caption_tags,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "IMAGE_EXTENSIONS",
    "ConceptDataError",
    "ConceptDataset",
    "ConceptSample",
    "ConceptSource",
    "apply_template",
    "collate",
    "load_concept_list",
    "load_prompt_list",
    "pad_to_square",
    "replace_tokens",
    "scan_concept",
    "shuffle_caption_tags",
]
