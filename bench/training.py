"""ED-LoRA's training-step overhead on the embedded model (CPU): layer-wise tokens vs plain LoRA.

One ED-LoRA step (``bench/trainstep.py``: VAE encode, noise, the prompt rewritten once per
cross-attention layer and encoded in one batched text-encoder call, UNet, loss, backward, AdamW
on the LoRA factors and the embeddings) against a plain-LoRA step on the same model (same LoRA,
one encoding of the prompt shared by every layer), timed back to back in every round::

    batch=B edlora_s=X plain_s=Y ratio=R flop_bound=F text_encoder_calls=1 (batch B*L)

``ratio`` = median over rounds of ED-LoRA time / plain time (goal: <= 1.3); ``flop_bound`` =
the ratio of the two steps' FLOP counts (``torch.utils.flop_counter``), which a time ratio
cannot beat by much. The script fails if an ED-LoRA step calls the text encoder more than once.

    python bench/training.py [--batch-sizes 1 4] [--rounds 30] [--threads 1] [--optimizer adamw]
"""

from __future__ import annotations

import argparse

import torch

from mixofshow.models.embedded import EMBEDDED_RESOLUTION, build_embedded_pipeline
from mixofshow.utils.memory import tune_cpu_allocator
from trainstep import Trainer, flop_ratio, paired_times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=30, help="timed (ED-LoRA, plain) pairs per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--optimizer", default="adamw", help="LoRA optimizer (the same in both steps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as mixofshow train runs
    trainer = Trainer(build_embedded_pipeline(), optimizer=args.optimizer)
    counter = Trainer(build_embedded_pipeline().to("meta"), optimizer=args.optimizer)  # FLOPs, all of attention
    layers = trainer.model.num_layers
    print(f"# embedded model on cpu ({args.threads} threads), {EMBEDDED_RESOLUTION} px, {layers} cross-attention "
          f"layers, optimizer {args.optimizer}; {args.rounds} rounds")
    for batch_size in args.batch_sizes:
        pixels, prompts = trainer.batch(batch_size, EMBEDDED_RESOLUTION)
        *_, bound = flop_ratio(counter, batch_size, EMBEDDED_RESOLUTION)
        trainer.text_calls.clear()
        trainer.step(pixels, prompts)
        if trainer.text_calls != [batch_size * layers]:
            raise SystemExit(f"an ED-LoRA step called the text encoder with batches {trainer.text_calls}, "
                             f"expected one call of {batch_size * layers}")
        ed, plain, ratio = paired_times(lambda: trainer.step(pixels, prompts),
                                        lambda: trainer.step(pixels, prompts, plain=True),
                                        trainer.device, args.rounds, warmup=2)
        print(f"batch={batch_size} edlora_s={ed:.4f} plain_s={plain:.4f} ratio={ratio:.3f} flop_bound={bound:.3f} "
              f"text_encoder_calls=1 (batch {batch_size}*{layers})", flush=True)


if __name__ == "__main__":
    main()
