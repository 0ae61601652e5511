"""``mixofshow export`` and ``mixofshow import``: concept files to and from other tools.

Examples::

    mixofshow export robot.safetensors --format diffusers --output robot_diffusers.safetensors
    mixofshow export robot.safetensors --format kohya --output robot_kohya.safetensors
    mixofshow import potter.pth potter.safetensors --base-model runwayml/stable-diffusion-v1-5 \\
        --class-word man
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_parser", "run_export", "run_import"]

_FORMATS = ("diffusers", "kohya")  # the exporters of run_export


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a concept's LoRA for diffusers or kohya tools",
        description="Write a concept's LoRA in the PEFT/diffusers layout (pipe.load_lora_weights) "
        "or kohya's layout. The layer-wise token embeddings cannot be expressed there; they are "
        "written beside as <output name>.embeddings.safetensors.",
    )
    p.add_argument("concept", help="concept file (.safetensors)")
    p.add_argument("--format", choices=_FORMATS, required=True, help="target layout")
    p.add_argument("--output", required=True, help="output .safetensors path")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "import",
        help="import an original Mix-of-Show ED-LoRA .pth checkpoint",
        description="Convert an original Mix-of-Show ED-LoRA .pth into a concept file. The .pth is "
        "read with torch.load(weights_only=True): files holding anything but tensors are refused.",
    )
    p.add_argument("pth", help="Mix-of-Show checkpoint (.pth)")
    p.add_argument("output", help="concept file to write (.safetensors)")
    p.add_argument(
        "--base-model",
        required=True,
        help="the base model it was trained on (embedded, hub id, folder or .safetensors); "
        "its shapes are checked and its name is recorded",
    )
    p.add_argument("--base-model-config", help="for a single-file base model of another architecture than "
                   "SD 1.5: a diffusers folder with its configs (default: SD 1.5's, shipped)")
    p.add_argument(
        "--class-word",
        action="append",
        default=[],
        metavar="[WORD=]CLASS",
        help="class word of the concept, e.g. 'man' (recorded for the last concept word, which "
        "Mix-of-Show initialises from it) or '<potter2>=man'; repeatable",
    )
    p.set_defaults(func=run_import)


def run_export(args) -> int:
    from mixofshow.utils.paths import check_output_file

    check_output_file(args.output, "--output")
    from mixofshow.concepts.export import export_diffusers_lora, export_kohya_lora
    from mixofshow.concepts.io import load_concept

    concept = load_concept(args.concept)
    if not concept.lora:
        raise ValueError(f"{args.concept}: the concept has no LoRA weights to export")
    exporters = {"diffusers": export_diffusers_lora, "kohya": export_kohya_lora}  # keys: _FORMATS
    lora_path, emb_path = exporters[args.format](concept, args.output)
    print(f"wrote {args.format} LoRA: {lora_path}")
    if emb_path is not None:
        print(f"wrote layer-wise embeddings (not loadable by plain {args.format}): {emb_path}")
    if args.format == "kohya" and concept.embeddings:
        from mixofshow.concepts.export import export_textual_inversion, textual_inversion_path

        ti = export_textual_inversion(concept, textual_inversion_path(lora_path, concept))
        print(f"wrote an A1111 / ComfyUI textual-inversion embedding (layer-wise tokens averaged): {ti}")
        print(f"  A1111: {lora_path.name} into models/Lora, {ti.name} into embeddings/; prompt "
              f"'a photo of {ti.stem} <lora:{lora_path.stem}:1>'")
        print(f"  ComfyUI: {lora_path.name} into models/loras (LoraLoader), {ti.name} into models/embeddings; "
              f"prompt 'a photo of embedding:{ti.stem}'")
    return 0


def _class_words(items: list[str], words: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        word, sep, cls = item.rpartition("=")
        if not sep:
            word = words[-1]
        if not cls.strip():
            raise ValueError(f"--class-word {item!r}: expected CLASS or WORD=CLASS")
        out[word.strip().lower()] = cls.strip()
    return out


def run_import(args) -> int:
    from mixofshow.utils.paths import check_output_file

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output {output}: expected a .safetensors path")
    check_output_file(output, "output")
    from mixofshow.concepts.export import import_mixofshow_pth
    from mixofshow.concepts.io import save_concept
    from mixofshow.models.loading import load_pipeline

    import_mixofshow_pth(args.pth)  # a bad file fails here, before the (slow) base-model load
    pipe = load_pipeline(args.base_model, config=args.base_model_config)
    concept = import_mixofshow_pth(args.pth, pipe, base_model=args.base_model)
    if args.class_word:
        concept.meta.class_words = _class_words(args.class_word, concept.meta.words)
        unknown = sorted(set(concept.meta.class_words) - set(concept.meta.words))
        if unknown:
            raise ValueError(f"--class-word names {unknown[0]!r}, not a concept word of {args.pth} {concept.meta.words}")
    save_concept(output, concept)
    print(
        f"imported {len(concept.meta.words)} concept words {concept.meta.words} and "
        f"{len(concept.lora)} LoRA layers (rank {concept.meta.rank}) into {output}"
    )
    return 0
