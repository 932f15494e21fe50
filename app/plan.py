"""Plan a pipeline split from a model's config alone (meta device: no weights are loaded).

    python -m app.plan --model models/configs/llama-3-70b.json --gpu-memory 80GiB
    python -m app.plan --model built:smollm2-135m-instruct --stages 2 --dtype bfloat16
    python -m app.plan --model bundled:all-MiniLM-L6-v2 --stages 2 --dtype float32   # an encoder

Prints each stage's layer range, parameter memory and KV cache per token, and, given
--gpu-memory, how many GPUs the model needs (the fewest stages whose largest fits in the GPU
less --reserve for KV cache and activations).
"""

from __future__ import annotations

import argparse
import re
import sys

from models.pipeline_plan import DTYPE_BYTES, Plan, gpus_needed, load_config, plan

UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 80GiB, 40GB or 24e9")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def render(p: Plan, dtype: str, gpu_bytes: int | None) -> str:
    gib = 2**30
    unit, scale = ("GiB", gib) if p.total_param_bytes >= gib else ("MiB", 2**20)
    lines = [
        f"{p.model_type}: {p.num_layers} layers, {p.total_param_bytes / scale:.2f} {unit} of parameters in {dtype}",
        f"{'stage':>5}  {'layers':>11}  {'params ' + unit:>10}  {'KV MiB/1k tokens':>16}",
    ]
    for s in p.stages:
        kv = f"{s.kv_bytes_per_token * 1000 / 2**20:.1f}" if s.kv_bytes_per_token else "-"  # an encoder keeps none
        lines.append(f"{s.index:>5}  {f'[{s.layers[0]}, {s.layers[1]})':>11}  {s.param_bytes / scale:>10.2f}  {kv:>16}")
    if gpu_bytes:
        lines.append(f"GPUs needed at {gpu_bytes / gib:.0f} GiB each: {len(p.stages)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m app.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        required=True,
        help="a config.json, a checkpoint directory, or a source (built:smollm2-135m-instruct)",
    )
    ap.add_argument("--stages", type=int, help="number of stages (default: the fewest that fit --gpu-memory)")
    ap.add_argument("--boundaries", type=int, nargs="*", help="explicit first layer of stages 1..N-1")
    ap.add_argument("--gpu-memory", type=parse_bytes, help="memory of one GPU, e.g. 80GiB")
    ap.add_argument("--reserve", type=float, default=0.2, help="share of each GPU kept for KV cache and activations")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    args = ap.parse_args(argv)
    if args.stages is None and args.gpu_memory is None:
        ap.error("give --stages, --gpu-memory, or both")
    config = load_config(args.model)
    try:
        if args.stages is None:
            p = gpus_needed(config, args.gpu_memory, args.dtype, args.reserve)
        else:
            p = plan(config, args.stages, args.dtype, args.boundaries)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(p, args.dtype, args.gpu_memory))
    if args.gpu_memory and p.max_stage_bytes > args.gpu_memory * (1 - args.reserve):
        print(f"warning: the largest stage needs {p.max_stage_bytes / 2**30:.1f} GiB; use more stages", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
