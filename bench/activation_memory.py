"""Activation memory per image of a phase-2 (fine-tune) step, counted exactly on the CPU.

    OMP_NUM_THREADS=2 python bench/activation_memory.py                 # ViT-L/14-336, bf16 autocast
    python bench/activation_memory.py --arch tiny --samples 1 2          # seconds, for a quick check

What backward keeps is what autograd saves during the forward. ``torch.autograd.graph.saved_tensors_hooks``
sees every tensor saved for backward (under non-reentrant activation checkpointing: the inputs of each
checkpointed block, plus everything saved outside the blocks); the script sums their bytes, counting
each storage once and leaving out the parameters themselves. It does that for 1 and 2 samples (4 views
each) and takes the difference, so the per-forward constant (autocast's bf16 copies of the weights,
saved by every matmul) drops out:

    per sample = saved(2 samples) - saved(1 sample);   per image = per sample / 4

The model is the trainer's GeoModel (random weights from ``bench/train_step.py``'s vision configs, sdpa
attention, ``model.train()``, whole backbone trainable) under CPU bf16 autocast, which casts like CUDA
autocast for the ops of this model (matmuls bf16, layer norms fp32). The attention kernel is read off
the autograd graph: on the CPU it is the flash kernel, which saves its output and log-sum-exp as
CUDA's flash kernel does (the math kernel would save the 577 x 577 attention matrix per head).

This is a count of saved activations, not an allocator measurement: the GPU's peak adds backward's
transient buffers, allocator fragmentation and the CUDA context. ``bench/gpu_check.py`` measures the
real peak per sample on a GPU. The script also turns the count into the largest phase-2 batch for a
40 GB A100 and an 80 GB H100 (``--headroom`` of the card kept free, weights + grads + AdamW state of
the model, DDP's gradient buckets, and autocast's bf16 weight copies counted).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ARCHS, NUM_VIEWS, build, criterion, fake_batch, machine

from geoloc.backbone import enable_gradient_checkpointing, set_backbone_trainable

README_GB_PER_IMAGE = 0.64  # the estimate behind the default train.finetune_batch_size x finetune_grad_accum
GPUS_GB = {"A100 40GB": 40.0, "H100 80GB": 80.0}
GB = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="vit-l-14-336", help="backbone vision config")
    p.add_argument("--pooling", default="projection", help="view embedding: projection | cls | mean")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="CPU autocast dtype")
    p.add_argument(
        "--samples",
        type=int,
        nargs=2,
        default=(1, 2),
        metavar=("N1", "N2"),
        help="the two batch sizes (samples of 4 views) whose difference is per-sample",
    )
    p.add_argument("--headroom", type=float, default=0.1, help="share of GPU memory kept free when sizing")
    p.add_argument("--num-classes", type=int, default=50, help="state classes of the head")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- counting


class SavedBytes:
    """Bytes of the distinct storages saved for backward, parameters excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude  # storage pointers of the parameters
        self.storages: dict[int, tuple[int, torch.dtype]] = {}

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude:
            self.storages[ptr] = (storage.nbytes(), t.dtype)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, dtype in self.storages.values():
            out[str(dtype).removeprefix("torch.")] = out.get(str(dtype).removeprefix("torch."), 0) + n
        return out


@contextmanager
def block_inputs(model, counter: SavedBytes, enabled: bool):
    """Count each encoder block's input: what non-reentrant checkpointing keeps for its recompute.

    Torch versions differ in whether that saving goes through the saved-tensor hooks; counting the input
    here as well is exact either way (a storage is counted once).
    """
    if not enabled:
        yield
        return

    def count_inputs(_module, args, kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                counter.add(a)

    layers = model.backbone.vision_model.encoder.layers
    handles = [layer.register_forward_pre_hook(count_inputs, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def graph_node_names(root) -> set[str]:
    """Names of every autograd node reachable from ``root`` (e.g. the attention kernel's backward)."""
    seen, stack, names = set(), [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__ if not hasattr(node, "name") else node.name())
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def attention_kernel(names: set[str]) -> str:
    hits = sorted(n for n in names if any(k in n.lower() for k in ("attention", "sdpa", "softmax")))
    return ", ".join(hits) or "none found"


def saved_for_backward(model, n: int, args, checkpointing: bool) -> tuple[SavedBytes, set[str]]:
    """Saved bytes of one training forward (+ loss) on ``n`` samples, and the graph's node names."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counter = SavedBytes(params)
    cfg = ARCHS[args.arch]
    batch = fake_batch(n, cfg, args.num_classes, torch.device("cpu"))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    batch["pixels"].requires_grad_(False)
    hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
    with hooks, block_inputs(model, counter, checkpointing), autocast:
        out = model(batch["pixels"], batch["view_mask"])
        loss = criterion(model.num_classes, batch["pixels"].device)(out, batch)["loss"]
    names = graph_node_names(loss.grad_fn)
    counter.exclude.add(batch["pixels"].untyped_storage().data_ptr())  # the input batch is not activation
    counter.storages.pop(batch["pixels"].untyped_storage().data_ptr(), None)
    del out, loss  # frees the graph
    return counter, names


# ----------------------------------------------------------------------------- sizing


def static_bytes(model, constant_saved: int) -> dict[str, int]:
    """Per-GPU bytes that do not grow with the batch in phase 2 (fp32 weights, AdamW, DDP buckets)."""
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "weights fp32": 4 * n,
        "grads fp32": 4 * trainable,
        "AdamW exp_avg + exp_avg_sq": 8 * trainable,
        "DDP gradient buckets": 4 * trainable,
        "per-forward saved (bf16 weight copies)": max(constant_saved, 0),
    }


def max_samples(gpu_gb: float, headroom: float, static: int, per_sample: int) -> int:
    """Largest batch (samples) whose saved activations fit beside the static bytes."""
    free = gpu_gb * GB * (1 - headroom) - static
    return max(int(free // per_sample), 0)


# ----------------------------------------------------------------------------- main


def measure(args, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    model = build(args.arch, args.pooling, args.num_classes, torch.device("cpu"))
    set_backbone_trainable(model, 0)  # phase 2: the whole backbone
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    results = {}
    for n in args.samples:
        t0 = time.perf_counter()
        counter, names = saved_for_backward(model, n, args, checkpointing)
        results[n] = {
            "bytes": counter.total,
            "by_dtype": counter.by_dtype(),
            "seconds": time.perf_counter() - t0,
        }
    n1, n2 = args.samples
    per_sample = (results[n2]["bytes"] - results[n1]["bytes"]) / (n2 - n1)
    return {
        "model": model,
        "runs": results,
        "per_sample": per_sample,
        "constant": results[n1]["bytes"] - n1 * per_sample,
        "attention": attention_kernel(names),
    }


def report(args, name: str, m: dict) -> None:
    n1, n2 = args.samples
    per_image = m["per_sample"] / NUM_VIEWS
    print(f"\n[{name}] attention backward: {m['attention']}")
    for n, r in m["runs"].items():
        dtypes = ", ".join(f"{k} {v / GB:.3f}" for k, v in sorted(r["by_dtype"].items()))
        print(
            f"  {n} sample(s) x {NUM_VIEWS} views: saved {r['bytes'] / GB:.3f} GB ({dtypes} GB), "
            f"{r['seconds']:.1f} s"
        )
    print(
        f"  per sample ({n2} - {n1}): {m['per_sample'] / GB:.4f} GB = {per_image / GB:.4f} GB per image "
        f"({per_image / GB / README_GB_PER_IMAGE:.2f} x the README's {README_GB_PER_IMAGE} GB)"
    )
    print(f"  per-forward constant (bf16 weight copies etc.): {m['constant'] / GB:.3f} GB")
    static = static_bytes(m["model"], m["constant"])
    total = sum(static.values())
    print(
        "  static per GPU: "
        + ", ".join(f"{k} {v / GB:.2f}" for k, v in static.items())
        + f" = {total / GB:.2f} GB"
    )
    for gpu, gb in GPUS_GB.items():
        fit = max_samples(gb, args.headroom, total, m["per_sample"])
        print(
            f"  {gpu}: {fit} samples ({fit * NUM_VIEWS} images) per forward fit "
            f"with {args.headroom:.0%} kept free"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"machine: {machine(torch.device('cpu'))}")
    cfg = ARCHS[args.arch]
    print(
        f"arch {args.arch} ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['image_size']} px), {args.precision} autocast on CPU, "
        f"samples {args.samples[0]} and {args.samples[1]}"
    )
    for name, ckpt in (("no activation checkpointing", False), ("activation checkpointing", True)):
        report(args, name, measure(args, ckpt))


if __name__ == "__main__":
    main()
